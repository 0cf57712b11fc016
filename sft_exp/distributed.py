"""distributed.* -> what the Trainer needs (DDP / FSDP2 / DeepSpeed settings), device checks, and this rank's place.

Every rank, local or a Slurm task, runs with RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT in its environment (set by sft_exp.launch) and joins the process group itself (`init_process_group`);
accelerate and DeepSpeed then find the group already there. Nothing here imports torch at module level.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from datetime import timedelta
from typing import Any

from sft_exp.attention import check_attention
from sft_exp.config import ConfigError, DistBackend, DistStrategy, Mode, RunConfig

RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0, or no process group at all: the only process that writes into the run directory."""
    return rank() == 0


def backend(run: RunConfig) -> str:
    import torch

    b = run.distributed.backend
    if b == DistBackend.auto:
        return "nccl" if torch.cuda.is_available() else "gloo"
    return b.value


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_devices(run: RunConfig, processes_here: int) -> None:
    """Refuse what would otherwise run wrongly or silently differently: nccl without GPUs, DeepSpeed not installed,
    attention kernels or liger that cannot run here, more processes on this node than devices. (FSDP on CPU ranks runs
    for real: see enable_fsdp_on_cpu.)"""
    import torch

    d = run.distributed
    cuda = torch.cuda.is_available()
    if d.backend == DistBackend.nccl and not cuda:
        raise ConfigError("distributed.backend: nccl needs CUDA GPUs. Use distributed.backend=gloo (or auto)")
    if d.strategy.value.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"distributed.strategy: {d.strategy.value} needs DeepSpeed, which is not installed. "
            "pip install deepspeed (or 'sft-exp[gpu]')"
        )
    if run.mode == Mode.train:  # prepare / inspect load no model
        check_attention(run.model.attn_implementation.value, run.train.use_liger_kernel, cuda)
    devices, what = (torch.cuda.device_count(), "GPUs") if cuda else (cpu_cores(), "CPU cores and no GPU")
    if processes_here > devices:
        raise ConfigError(
            f"distributed.processes_per_node: {processes_here} processes on this node but it has {devices} {what}. "
            f"Use distributed.processes_per_node<={devices}"
        )


def trainer_kwargs(run: RunConfig) -> dict[str, Any]:
    """The SFTConfig fields that the distributed group decides."""
    import torch

    d = run.distributed
    cuda = torch.cuda.is_available()
    kw: dict[str, Any] = {
        "ddp_timeout": d.timeout_minutes * 60,
        # Every parameter gets a gradient in a causal LM; the search for unused ones only costs time (and warns).
        "ddp_find_unused_parameters": False,
        # On a CPU say so: TrainingArguments refuses bf16 otherwise, and without it accelerate finds no backend for
        # the ranks (it would count 1 process while the gloo group has N). DeepSpeed still engages (the Trainer's
        # Accelerator is not told cpu=True); sft_exp.train checks that it did.
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
    from accelerate.state import AcceleratorState, PartialState
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
    # The same two writes AcceleratorState.__init__ makes when it accepts the plugin on a GPU.
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return accelerator.distributed_type == DistributedType.FSDP and accelerator.is_fsdp2


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
