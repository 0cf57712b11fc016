"""One rank of a run: join the process group from the environment, then run the frozen config of the run directory.

    python -m sft_exp.launch.rank <run dir> [--resume-from <checkpoint>]   (spawned by sft_exp.launch.multiprocess)

A Slurm task calls `run_rank` in-process (sft_exp.launch.slurm) after setting the same environment from submitit's
JobEnvironment. Exit codes: 0 done, 128 + signal when stopped on SIGTERM/SIGUSR1 (checkpoint saved), 2 for a
configuration or data error, 74 when a save failed (disk full, permissions: sft_exp.checkpoints.SaveFailed), 1
otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from sft_exp.checkpoints import Interrupted, SaveFailed
from sft_exp.config import ConfigError


def run_rank(
    run_dir: Path,
    resume_from: Path | None,
    started: float | None = None,
    prepared: Any = None,
    report: bool = False,
) -> dict[str, Any]:
    """This rank's share of the run; the environment already says who it is (RANK, WORLD_SIZE, MASTER_*)."""
    import torch

    from sft_exp.distributed import destroy_process_group, init_process_group
    from sft_exp.run import execute
    from sft_exp.rundir import load_frozen

    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    init_process_group(load_frozen(run_dir))
    try:
        return execute(run_dir, started, resume_from=resume_from, prepared=prepared, report=report)
    finally:
        destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sft_exp.launch.rank", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--resume-from", type=Path, default=None)
    a = ap.parse_args(argv)
    from sft_exp.launch.multiprocess import die_with_launcher

    die_with_launcher()
    rank = os.environ.get("RANK", "0")
    try:
        run_rank(a.run_dir, a.resume_from)
    except Interrupted as e:
        print(f"[rank {rank}] {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except (ConfigError, FileNotFoundError) as e:
        print(f"[rank {rank}] error: {e}", file=sys.stderr, flush=True)
        return 2
    except SaveFailed as e:
        print(f"[rank {rank}] error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
