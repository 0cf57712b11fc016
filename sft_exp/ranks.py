"""Who this process is in a multi-process run: its rank and the world size, from the environment torchrun, our local
launcher or a Slurm task set. Rank 0 (or a plain process) is the only one that writes into the run directory."""

from __future__ import annotations

import os


def rank() -> int:
    """RANK (torchrun, local ranks), else SLURM_PROCID (a Slurm task before it joined), else 0."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0, or no process group at all: the only process that writes into the run directory."""
    return rank() == 0
