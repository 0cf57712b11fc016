"""Resolve the config once, freeze it in the run directory; every other process reads that file, never Hydra."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sft_exp.config.schema import RunConfig, dump_run_config, to_run_config
from sft_exp.io import read_json, write_json
from sft_exp.lock import LOCK_FILE
from sft_exp.rundir import RunDir, check_fresh

REPO_ROOT = Path(__file__).resolve().parents[2]


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def write_lock(run: RunConfig, run_dir: Path) -> dict[str, Any]:
    """Write <run dir>/lock.json (sft_exp/lock.py: versions, resolved revisions, content and template hashes, git
    state) and return it. A run made with `lock=<dir>` is warned about local sources whose content changed since.

    Example:
        >>> lock = write_lock(run, Path("outputs/runs/x"))  # doctest: +SKIP
        >>> sorted(lock)  # doctest: +SKIP
        ['git', 'model', 'sources', 'template_sha256', 'versions']
    """
    from sft_exp.data.sources import fingerprint
    from sft_exp.lock import build_lock, check_local_content

    lock = build_lock(run, fingerprint, REPO_ROOT)
    write_json(run_dir / LOCK_FILE, lock)
    if run.lock:
        old = read_json(Path(run.lock).expanduser() / LOCK_FILE) or {}
        now = {n: e["content_hash"] for n, e in lock["sources"].items()}
        for line in check_local_content(old, now, run.lock):
            print(f"warning: {line}", file=sys.stderr, flush=True)
    return lock


def freeze(run: RunConfig, run_dir: Path, overrides: list[str]) -> None:
    """Write the resolved config, its lock (lock.json) and the run's description (run_info.json) into a fresh run
    directory."""
    check_fresh(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    RunDir(run_dir).frozen.write_text(dump_run_config(run))
    lock = write_lock(run, run_dir)
    write_json(
        RunDir(run_dir).info,
        {
            "git_sha": git_sha(),
            "git_dirty": lock["git"]["dirty"],
            "lock": LOCK_FILE,  # versions, resolved revisions, template hash: re-run with `lock=<this run dir>`
            "locked_from": run.lock,
            "overrides": overrides,
            "argv": sys.argv,
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": sys.version.split()[0],
        },
    )


def load_frozen(run_dir: Path) -> RunConfig:
    from omegaconf import OmegaConf

    path = RunDir(run_dir).frozen
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a sft-exp run directory?")
    cfg = OmegaConf.load(path)
    lock = cfg.pop("lock", None)  # applied once, when the run was made: the frozen config already holds it
    run = to_run_config(cfg)
    run.lock = lock
    return run


def cache_dir(run: RunConfig) -> Path:
    """The tokenised-source cache: `cache_dir` (conf/config.yaml: ${paths.output_dir}/cache, absolute once resolved).
    Null only in a run frozen before conf/paths existed: outputs/cache under the current directory."""
    return Path(run.cache_dir or Path("outputs", "cache").absolute())
