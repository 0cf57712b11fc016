"""sft-exp's entry point: compose (Hydra) -> validate -> freeze the run directory -> run it.

    python launch.py                                  # the embedded default: tiny SmolLM3 on the demo mixture
    python launch.py mode=prepare                     # build, tokenise and pack the mixture, print its table
    python launch.py --cfg job                        # print the composed config
    python launch.py -m train.learning_rate=1e-3,3e-3 # a sweep

Only this file, sft_exp/config/hydra_glue.py and sft_exp/launch/ know Hydra; everything below receives the frozen
RunConfig. Heavy imports (torch, transformers) start behind sft_exp.launch.start, so --cfg and --help stay fast.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import sys
import time
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from sft_exp.compat import close_progress_bars
from sft_exp.config import RunConfig, to_run_config, validate
from sft_exp.config.compose_errors import check_composes
from sft_exp.config.frozen import freeze
from sft_exp.config.hydra_glue import register_configs
from sft_exp.config.keys import check_known_keys
from sft_exp.errors import ConfigError, SftExpError, exit_code_of
from sft_exp.io import read_json, write_json
from sft_exp.rundir import RunDir, check_fresh

register_configs()


def compose_and_validate(cfg: DictConfig) -> RunConfig:
    check_known_keys(cfg, RunConfig)  # `+train.typo=1` would otherwise be kept as a stray key nothing reads
    run = to_run_config(cfg)
    validate(run)
    return run


def freeze_run_dir(run: RunConfig) -> Path:
    from sft_exp.launch.sweep_callback import describe_job

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    # The tracker's run name and group are frozen with the config, so every process of the run (ranks, a requeued
    # Slurm job) names it the same without Hydra.
    job = describe_job(hc)
    run.tracking.name = run.tracking.name or job["name"]
    if run.tracking.group is None and job["sweep_dir"]:
        run.tracking.group = job["group"]
    freeze(run, run_dir, list(hc.overrides.task))
    if job["sweep_dir"]:
        write_json(RunDir(run_dir).sweep_job, {**job, "objective": run.sweep.objective})
    return run_dir


def fail(e: BaseException, code: int) -> NoReturn:
    print(f"error: {e}", file=sys.stderr)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        # In a sweep, one bad combination fails its own job (recorded in the sweep index); the others still run.
        raise RuntimeError(str(e))
    if HydraConfig.initialized():
        discard_refused_run_dir(Path(HydraConfig.get().runtime.output_dir))
    raise SystemExit(code)


def discard_refused_run_dir(run_dir: Path) -> None:
    """A refused command leaves nothing behind: Hydra made the run directory (.hydra/) before any of our checks ran,
    and a data or template error found while preparing comes after the config was frozen there. Removed only while
    it holds nothing but those files (no checkpoint, no model, nothing of a resumed run), with the date folders it
    leaves empty."""
    if not run_dir.is_dir() or any(p.name not in REFUSED_RUN_FILES for p in run_dir.iterdir()):
        return
    if len(read_json(RunDir(run_dir).attempts) or []) > 1:  # a resumed run: its directory is not this command's
        return
    logging.shutdown()  # Hydra's handler holds launch.log open
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in list(run_dir.parents)[:3]:  # the default outputs/runs/<date>/<time>: the folders left empty
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}|runs|outputs", parent.name):
            with contextlib.suppress(OSError):
                parent.rmdir()


# What a new run has written when a config, data or template error stops it before training.
REFUSED_RUN_FILES = {".hydra", "launch.log", "train.log", "run_config.yaml", "run_info.json", "lock.json"}
REFUSED_RUN_FILES |= {"attempts.json", "mixture_stats.json", "logs", "sweep_job.json", "tracking.json"}


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    started = time.time()
    try:
        run = compose_and_validate(cfg)
    except ConfigError as e:
        fail(e, e.exit_code)
    from sft_exp.launch import HydraJob, start

    try:
        # Settles the run directory (a new one, frozen by freeze_run_dir, or the one resumed), then runs it: here in
        # this process, as N local ranks, or as this Slurm task's rank (sft_exp/launch/).
        metrics = start(run, HydraJob.current(), lambda: freeze_run_dir(run), started)
    except (SftExpError, FileNotFoundError) as e:
        close_progress_bars()  # closed at exit otherwise: their last line would come after the error
        fail(e, exit_code_of(e) or 2)
    if not isinstance(metrics, dict):
        return None
    if run.sweep.objective.startswith("gen/"):
        from sft_exp.eval.scorers import sweeper_value

        return sweeper_value(run, metrics)  # a generation metric, negated when higher is better (sweepers minimise)
    from sft_exp.eval import objective

    # overall or one source's eval loss; a harness/... score negated when higher is better (sft_exp.eval.objective)
    return objective.to_minimise(metrics, run.sweep.objective)


def refuse_existing_run_dir(argv: list[str]) -> None:
    """Hydra writes .hydra/ into the run directory before any of our code runs: refuse a directory that already
    holds a run first, so nothing of it is overwritten (resume=... is the way back into one)."""
    if any(a.startswith("resume=") and a != "resume=false" for a in argv):
        return
    for a in reversed(argv):  # the last override wins, as in Hydra
        if a.startswith("hydra.run.dir="):
            try:
                check_fresh(Path(a.split("=", 1)[1]))
            except ConfigError as e:
                print(f"error: {e}", file=sys.stderr)
                raise SystemExit(2) from None
            return


if __name__ == "__main__":
    refuse_existing_run_dir(sys.argv[1:])
    try:  # Hydra would print its own block and exit 1; nothing is written yet
        check_composes(Path(__file__).parent / "conf", "config", sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    main()
