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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sft_exp.errors import Interrupted, exit_code_of


def run_rank(
    run_dir: Path,
    resume_from: Path | None,
    started: float | None = None,
    prepared: Any = None,
    report: bool = False,
    on_error: Callable[[BaseException], None] | None = None,
) -> dict[str, Any]:
    """This rank's share of the run; the environment already says who it is (RANK, WORLD_SIZE, MASTER_*).

    `on_error` sees an error before the process group is destroyed: the other ranks fail on the lost connection only
    after this rank has reported why."""
    import torch

    from sft_exp.config.frozen import load_frozen
    from sft_exp.launch.distributed import destroy_process_group, init_process_group
    from sft_exp.run import execute

    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    init_process_group(load_frozen(run_dir))
    try:
        return execute(run_dir, started, resume_from=resume_from, prepared=prepared, report=report)
    except BaseException as e:
        if on_error is not None:
            on_error(e)
        raise
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

    def report(e: BaseException) -> None:
        """A clear error: say it, then exit at once with its code, without tearing the process group down first: the
        other ranks lose the connection only now, after the report, and the launcher sees this exit code first.
        (A stop signal is no error: every rank stopped at the same step; they leave the usual way.)"""
        code = exit_code_of(e)
        if code is None or isinstance(e, Interrupted):
            return
        print(f"[rank {rank}] error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(code)

    try:
        run_rank(a.run_dir, a.resume_from, on_error=report)
    except Interrupted as e:
        print(f"[rank {rank}] {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except BaseException as e:  # before the process group existed (or a bug: its traceback is the report)
        report(e)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
