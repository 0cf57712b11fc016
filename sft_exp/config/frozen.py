"""Resolve the config once, freeze it in the run directory; every other process reads that file, never Hydra."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from sft_exp.config.schema import RunConfig, dump_run_config, to_run_config
from sft_exp.io import write_json
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


def freeze(run: RunConfig, run_dir: Path, overrides: list[str]) -> None:
    """Write the resolved config and the run's description into a fresh run directory."""
    check_fresh(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    RunDir(run_dir).frozen.write_text(dump_run_config(run))
    write_json(
        RunDir(run_dir).info,
        {
            "git_sha": git_sha(),
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
    return to_run_config(OmegaConf.load(path))


def cache_dir(run: RunConfig) -> Path:
    """The tokenised-source cache: `cache_dir` (conf/config.yaml: ${paths.output_dir}/cache, absolute once resolved).
    Null only in a run frozen before conf/paths existed: outputs/cache under the current directory."""
    return Path(run.cache_dir or Path("outputs", "cache").absolute())
