"""How a run's processes start, and where they write: the layer between Hydra (launch.py) and sft_exp.run.

    launch.py (Hydra composed once) -> start(run, HydraJob.current(), freeze)
        under submitit (a Slurm task)  -> slurm.run_task: rank/world from submitit.JobEnvironment, joins directly
        otherwise                      -> local.run_local: in-process (one process), or N ranks spawned here

Every path first settles the run directory (sft_exp.launch.resume.open_run_dir): a new one is frozen once; with
`resume=` (or when Slurm requeued this very job) the existing one is reused and training continues from its last
complete checkpoint. Ranks never compose a config: they read run_config.yaml from that directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sft_exp.config import Mode, RunConfig
from sft_exp.launch.job import HydraJob


def under_submitit() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def start(run: RunConfig, job: HydraJob, freeze: Callable[[], Path], started: float) -> dict[str, Any]:
    """Run `run` where it belongs; returns its metrics (rank 0's view). `freeze` writes a new run directory."""
    quiet_library_noise()
    # Before the run directory exists: what transformers would refuse later (model, tokenizer, trainer values).
    from sft_exp.train.model import check_model_loads

    check_model_loads(run)
    if run.mode == Mode.train:
        from sft_exp.train.sft_config import check_trainer_config

        check_trainer_config(run)
        if run.eval.harness.tasks:  # an unknown lm-eval task, or its missing data, fails now, not after training
            from sft_exp.eval.harness import check_tasks

            check_tasks(run.eval.harness, load=run.eval.harness.check_data)
    if under_submitit():
        from sft_exp.launch.slurm import run_task

        return run_task(run, job, freeze, started)
    from sft_exp.launch.local import run_local

    return run_local(run, job, freeze, started)


def quiet_library_noise() -> None:
    """Lines libraries print that tell the user nothing: DeepSpeed's import warns on every CPU-only run that it was
    "unable to detect" a GPU unless told the accelerator. Ranks and Slurm tasks inherit the environment."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
