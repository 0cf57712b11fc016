"""Shared fixtures: Hydra composition without launching, and the repo's paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
PY = sys.executable

# Tests never touch the network: the hub is unreachable here and nothing may be downloaded.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def compose(overrides: list[str] | None = None, return_hydra_config: bool = False):
    """Compose the root config the way `python launch.py <overrides>` would, without running anything."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sft_exp.config.hydra_glue import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides or [], return_hydra_config=return_hydra_config)


def launch(args: list[str], cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python launch.py args...` from the repo in cwd (outputs land under cwd)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [PY, str(REPO / "launch.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenised-data cache for the whole test session, as the runs of a sweep share one."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def fast_args(tmp_path: Path, shared_cache: Path) -> list[str]:
    """Overrides that keep an end-to-end run of the default short; the run lands in tmp_path/run."""
    return [
        f"hydra.run.dir={tmp_path}/run",
        f"cache_dir={shared_cache}",
        "train.max_steps=6",
        "train.logging_steps=2",
        "mixture.test_split_size=8",
        "packing.max_length=512",
    ]


def checkpointed_run_args(cache: Path, run_dir: str | Path) -> list[str]:
    """A short run that checkpoints every 2 of its 8 steps (resume, requeue and multi-rank tests)."""
    return [
        f"hydra.run.dir={run_dir}",
        f"cache_dir={cache}",
        "train.max_steps=8",
        "train.logging_steps=1",
        "train.save_strategy=steps",
        "train.save_steps=2",
        "mixture.test_split_size=4",
        "packing.max_length=256",
        "eval_before_train=false",
    ]
