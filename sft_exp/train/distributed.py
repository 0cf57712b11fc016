"""distributed.* -> what the Trainer needs: DDP / FSDP2 / DeepSpeed fields of the SFTConfig, and FSDP2 on CPU ranks."""

from __future__ import annotations

import copy
from typing import Any

import torch

from sft_exp.compat import accelerate_enable_fsdp
from sft_exp.config import ConfigError, DistBackend, DistStrategy, RunConfig
from sft_exp.ranks import world_size


def backend(run: RunConfig) -> str:
    b = run.distributed.backend
    if b == DistBackend.auto:
        return "nccl" if torch.cuda.is_available() else "gloo"
    return b.value


def trainer_kwargs(run: RunConfig) -> dict[str, Any]:
    """The SFTConfig fields that the distributed group decides."""
    d = run.distributed
    cuda = torch.cuda.is_available()
    kw: dict[str, Any] = {
        "ddp_timeout": d.timeout_minutes * 60,
        # Every parameter gets a gradient in a causal LM; the search for unused ones only costs time (and warns).
        "ddp_find_unused_parameters": False,
        # On a CPU say so: TrainingArguments refuses bf16 otherwise, and without it accelerate finds no backend for
        # the ranks (it would count 1 process while the gloo group has N). DeepSpeed still engages (the Trainer's
        # Accelerator is not told cpu=True); sft_exp.train.loop checks that it did.
        "use_cpu": not cuda,
    }
    if world_size() > 1 or d.strategy != DistStrategy.single:
        kw["ddp_backend"] = backend(run)
    if d.strategy.value.startswith("zero"):
        ds = copy.deepcopy(dict(d.deepspeed))  # transformers fills in the "auto" values in place
        if ds.get("train_batch_size") == "auto":
            # transformers fills it from args.world_size before the process group is read (it says 1 on a CPU),
            # so DeepSpeed would reject micro x accumulation x ranks != it; without it DeepSpeed derives it.
            del ds["train_batch_size"]
        kw["deepspeed"] = ds
    if d.strategy == DistStrategy.fsdp:
        kw["fsdp"] = True
        kw["fsdp_config"] = copy.deepcopy(dict(d.fsdp))
    return kw


def enable_fsdp_on_cpu(accelerator: Any, plugin_args: dict[str, Any]) -> bool:
    """Turn an Accelerator made for CPU ranks (gloo) into an FSDP2 one: accelerate (1.x) only honours an FSDP plugin
    on accelerator devices and otherwise drops it, so the Trainer would train plain DDP under the name FSDP. Torch's
    fully_shard itself runs on a CPU mesh over gloo, and everything after this (accelerate's fsdp2_prepare_model,
    sharded checkpoints through torch.distributed.checkpoint, the gathered final save) is the code path GPUs take.
    Returns True once the state says FSDP."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.NO) or state.device.type != "cpu":
        raise ConfigError(
            f"distributed.strategy: fsdp, but accelerate set up {state.distributed_type} on {state.device} "
            "without FSDP. Check the accelerate config/environment (ACCELERATE_* variables) of this run"
        )
    plugin = FullyShardedDataParallelPlugin(**plugin_args)
    if plugin.fsdp_version != 2:
        raise ConfigError("distributed.fsdp.version: only FSDP2 (version: 2) runs on CPU ranks. Use version: 2")
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    accelerate_enable_fsdp(plugin)
    return accelerator.distributed_type == DistributedType.FSDP and accelerator.is_fsdp2
