"""Process-group setup for a rank: join from the environment, leave at the end.

Every rank, local or a Slurm task, runs with RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT in its environment (set by sft_exp.launch) and joins the process group itself (`init_process_group`);
accelerate and DeepSpeed then find the group already there.
"""

from __future__ import annotations

import os
from datetime import timedelta

from sft_exp.config import DistStrategy, RunConfig
from sft_exp.ranks import world_size
from sft_exp.train.distributed import backend

RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def init_process_group(run: RunConfig) -> None:
    """Join the process group from the RANK/WORLD_SIZE/MASTER_* environment (no-op for a single process)."""
    import torch
    import torch.distributed as dist

    if world_size() == 1 and run.distributed.strategy in (DistStrategy.single, DistStrategy.ddp):
        return
    if dist.is_initialized():
        return
    b = backend(run)
    if b == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=b, timeout=timedelta(minutes=run.distributed.timeout_minutes))


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
