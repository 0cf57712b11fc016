"""Marks each checkpoint complete once every rank has written it, then rotates (sft_exp.checkpoints' protocol)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist
from transformers import TrainerCallback

from sft_exp.checkpoints import mark_complete, rotate, save_guard


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class CompleteCheckpoints(TrainerCallback):
    """After the Trainer saved checkpoint-N: barrier, marker (rank 0), then rotation to `save_total_limit` complete
    checkpoints (the Trainer's own rotation counts half-written folders, so it is off)."""

    def __init__(self, save_total_limit: int | None) -> None:
        self.save_total_limit = save_total_limit

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _barrier()  # every rank's shards, optimizer state and RNG state are on disk
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            with save_guard(f"{ckpt.name} save", ckpt, Path(args.output_dir)):
                mark_complete(ckpt, state.global_step)
            # Only after a complete save: a failed one raised above, so it never makes rotation drop anything.
            rotate(Path(args.output_dir), self.save_total_limit, state.best_model_checkpoint)
