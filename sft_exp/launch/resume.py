"""Which run directory a job writes into, and from which checkpoint it continues.

- A new run (resume=false): Hydra's new output directory, frozen once. A directory that already holds a run is
  never written over (sft_exp.rundir.check_fresh), except by the requeued Slurm job that made it (its job id is in
  attempts.json).
- resume=<run dir>: that run. resume=true: the newest run directory under the root of hydra.run.dir (or of the sweep
  directory, in a multirun) whose recorded overrides equal this command's (resume= and launcher.* left aside).
- A resumed run keeps its frozen config: the command must compose the same config (resume, launcher, tracking and
  cache_dir may differ), otherwise it is refused with the differing keys. Training continues from the newest
  complete checkpoint (sft_exp.checkpoints); half-written checkpoints are deleted; with none, it starts over in the
  same directory.
- Every start appends one line to <run dir>/attempts.json (host, Slurm job id and restart count, resumed_from).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sft_exp.checkpoints import last_complete_checkpoint, prune_incomplete
from sft_exp.config import ConfigError, RunConfig
from sft_exp.config.frozen import load_frozen
from sft_exp.config.naming import NOT_EXPERIMENT
from sft_exp.io import write_json
from sft_exp.launch.job import HydraJob
from sft_exp.rundir import RunDir

# Keys a resumed command may change: they do not change what is trained.
MAY_DIFFER = NOT_EXPERIMENT


def _override_key(overrides: list[str]) -> list[str]:
    """The overrides that define a run: without resume= and launcher choices (a run may be resumed elsewhere)."""
    keep = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key == "resume" or key == "launcher" or key.startswith("launcher."):
            continue
        keep.append(o)
    return sorted(keep)


def _search_root(pattern: str) -> tuple[Path, bool]:
    """(root, exact): the fixed part of a run-directory pattern; exact when the pattern has no interpolation."""
    prefix = pattern.split("${", 1)[0]
    if prefix == pattern:
        return Path(pattern), True
    return (Path(prefix) if prefix.endswith("/") else Path(prefix).parent), False


def find_latest_run(job: HydraJob) -> Path:
    root, exact = _search_root(job.dir_pattern)
    if exact:
        candidates = [root] if RunDir(root).is_run() else []
    else:
        candidates = [p.parent for depth in range(1, 6) for p in root.glob("*/" * depth + RunDir(root).frozen.name)]
    want = _override_key(job.overrides)
    matches = []
    for c in candidates:
        try:
            info = json.loads(RunDir(c).info.read_text())
        except (OSError, ValueError):
            continue
        if _override_key(list(info.get("overrides", []))) == want:
            matches.append(c)
    if not matches:
        raise ConfigError(
            f"resume: no run directory under {root} was made with the overrides {want}. "
            "Run the same command as the run you want to continue (plus resume=true), or pass resume=<run dir>"
        )
    return max(matches, key=lambda c: RunDir(c).frozen.stat().st_mtime)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): d}


def config_differences(frozen: RunConfig, current: RunConfig) -> list[str]:
    from omegaconf import OmegaConf

    a = _flat(OmegaConf.to_container(OmegaConf.structured(frozen), enum_to_str=True))
    b = _flat(OmegaConf.to_container(OmegaConf.structured(current), enum_to_str=True))
    diffs = []
    for k in sorted(set(a) | set(b)):
        if k.split(".")[0] in MAY_DIFFER:
            continue
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            diffs.append(f"{k}: {a.get(k, '<absent>')} in the run, {b.get(k, '<absent>')} now")
    return diffs


def _check_resumable(run: RunConfig, run_dir: Path) -> None:
    if RunDir(run_dir).is_finished():
        raise ConfigError(
            f"resume: the run in {run_dir} has finished (it has {RunDir(run_dir).metrics.name}); there is nothing to "
            "continue. "
            "Start a new run without resume"
        )
    diffs = config_differences(load_frozen(run_dir), run)
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise ConfigError(
            f"resume: this command's config differs from the run's in {run_dir} ({shown}). A resumed run continues "
            "with its frozen config: repeat the original overrides"
        )


def _drop_unused_output_dir(out: Path, run_dir: Path) -> None:
    """Hydra made a fresh output directory before we knew this job resumes another: move its log to the resumed run
    and remove it, when it holds nothing but Hydra's own files."""
    if not out.is_dir() or out.resolve() == run_dir.resolve():
        return
    if any(p.name != ".hydra" and p.suffix != ".log" for p in out.iterdir()):
        return
    for logger in [logging.getLogger(), *[logging.getLogger(n) for n in logging.root.manager.loggerDict]]:
        for h in list(getattr(logger, "handlers", [])):
            if isinstance(h, logging.FileHandler) and Path(h.baseFilename).parent.resolve() == out.resolve():
                logger.removeHandler(h)
                h.close()
                new = logging.FileHandler(run_dir / Path(h.baseFilename).name, mode="a")
                new.setFormatter(h.formatter)
                new.setLevel(h.level)
                logger.addHandler(new)
    shutil.rmtree(out, ignore_errors=True)


def record_attempt(run_dir: Path, attempt: dict[str, Any]) -> None:
    path = RunDir(run_dir).attempts
    try:
        attempts = json.loads(path.read_text()) if path.exists() else []
    except ValueError:
        attempts = []
    write_json(path, [*attempts, attempt])


def _attempts(run_dir: Path) -> list[dict[str, Any]]:
    try:
        return json.loads(RunDir(run_dir).attempts.read_text())
    except (OSError, ValueError):
        return []


def open_run_dir(
    run: RunConfig, job: HydraJob, freeze: Callable[[], Path], slurm_job_id: str | None = None
) -> tuple[Path, Path | None]:
    """Settle the run directory (rank 0 only, before any other rank starts) -> (run_dir, checkpoint to resume)."""
    out = job.output_dir
    requeued = False
    if run.resume is False:
        # Slurm requeued this very job (preemption, time limit, scontrol requeue): it continues its own run.
        requeued = slurm_job_id is not None and any(a.get("slurm_job_id") == slurm_job_id for a in _attempts(out))
        # Otherwise a new run; freeze refuses a directory that already holds one (sft_exp.rundir.check_fresh).
        run_dir = out if requeued else freeze()
    else:
        run_dir = Path(run.resume) if isinstance(run.resume, str) else find_latest_run(job)
        _check_resumable(run, run_dir)
        if not job.multirun:
            _drop_unused_output_dir(out, run_dir)

    resume_from = None
    if requeued or run.resume is not False:
        for p in prune_incomplete(run_dir):
            print(f"[sft-exp] removed {p.name}: its save never completed", flush=True)
        resume_from = last_complete_checkpoint(run_dir)
        where = f"from {resume_from.name}" if resume_from else "from the start (no complete checkpoint yet)"
        print(f"[sft-exp] resuming {run_dir} {where}", flush=True)
    record_attempt(
        run_dir,
        {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": slurm_job_id,
            "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
            "world_size": run.distributed.nodes * run.distributed.processes_per_node,
            "resumed_from": resume_from.name if resume_from else None,
        },
    )
    return run_dir, resume_from
