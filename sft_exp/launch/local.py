"""Runs on this machine: one process in-process, or N ranks started here (sft_exp.launch.ranks)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sft_exp.checkpoints import SaveFailed
from sft_exp.config import ConfigError, DistStrategy, Mode, RunConfig
from sft_exp.errors import Interrupted
from sft_exp.io import read_json
from sft_exp.launch.job import HydraJob
from sft_exp.launch.report import console_copied_to, final_summary
from sft_exp.launch.resume import open_run_dir
from sft_exp.rundir import RunDir, resume_arg


def resume_command(run_dir: Path, job: HydraJob) -> str:
    """The shell command that continues the run: this job's overrides (quoted as needed) + resume=<run dir>."""
    return job.command(resume_arg(run_dir))


def resume_hint(run_dir: Path, job: HydraJob) -> str:
    return f"continue it with: {resume_command(run_dir, job)}"


def run_local(run: RunConfig, job: HydraJob, freeze: Callable[[], Path], started: float) -> dict[str, Any]:
    from sft_exp.config.preflight import check_devices

    d = run.distributed
    if d.nodes > 1:
        raise ConfigError(
            f"distributed.nodes: {d.nodes} nodes need Slurm. Add launcher=slurm (or -m hydra/launcher=submitit_slurm), "
            "or set distributed.nodes=1"
        )
    n = d.processes_per_node
    ranks = n if run.mode == Mode.train else 1  # prepare / inspect never need more than one process
    check_devices(run, ranks)  # before the run directory exists: a refused run leaves nothing behind
    run_dir, resume_from = open_run_dir(run, job, freeze)
    with console_copied_to(RunDir(run_dir).console_log):
        print(f"run directory: {run_dir}", flush=True)
        result = _run(run, run_dir, job, ranks, resume_from, started)
        print(final_summary(run, run_dir, result, job), flush=True)
    return result


def _run(
    run: RunConfig, run_dir: Path, job: HydraJob, ranks: int, resume_from: Path | None, started: float
) -> dict[str, Any]:
    try:
        if ranks == 1:
            return _in_process(run, run_dir, resume_from, started)
        from sft_exp.config.frozen import load_frozen
        from sft_exp.launch.ranks import start_ranks
        from sft_exp.run import prepare

        prepare(load_frozen(run_dir), run_dir)  # once, here: the ranks then read the tokenised cache
        start_ranks(run, run_dir, ranks, resume_from)
        return read_json(RunDir(run_dir).metrics)
    except Interrupted as e:
        print(f"[sft-exp] {e}; {resume_hint(run_dir, job)}", flush=True)
        raise SystemExit(e.exit_code) from None
    except SaveFailed as e:  # launch.py reports it (short, no traceback) and exits with e.exit_code
        e.command = resume_command(run_dir, job)
        raise


def _in_process(run: RunConfig, run_dir: Path, resume_from: Path | None, started: float) -> dict[str, Any]:
    from sft_exp.launch.distributed import RANK_ENV, destroy_process_group, init_process_group
    from sft_exp.run import execute

    saved = {k: os.environ.get(k) for k in RANK_ENV}
    if run.mode == Mode.train and run.distributed.strategy not in (DistStrategy.single, DistStrategy.ddp):
        # FSDP and DeepSpeed need a process group even for one process.
        from torch.distributed.elastic.utils.distributed import get_free_port

        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(run.distributed.master_port or get_free_port()),
        )  # fmt: skip
        init_process_group(run)
    try:
        return execute(run_dir, started, resume_from=resume_from)
    finally:
        destroy_process_group()
        # The next job of a local sweep runs in this process: it must not inherit this one's rank environment.
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
