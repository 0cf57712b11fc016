"""Checks that depend on the machine rather than the config alone (CUDA, installed packages, cores): they run after
validate() and before the run directory exists, so a refused run leaves nothing behind."""

from __future__ import annotations

import importlib.util
import os

from sft_exp.config.schema import DistBackend, Mode, RunConfig
from sft_exp.errors import ConfigError

VARLEN = "varlen"  # sft_exp.train.attention.NAME


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def varlen_available() -> bool:
    """PyTorch ships the FlashAttention varlen kernel (torch >= 2.9)."""
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


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


def check_attention(attn_implementation: str, use_liger_kernel: bool, cuda: bool) -> None:
    """Refuse, before anything is written, attention kernels and liger where they cannot run."""
    if attn_implementation == VARLEN:
        if not varlen_available():
            raise ConfigError(
                "model.attn_implementation: varlen needs torch >= 2.9 (torch.nn.attention.varlen). "
                "Upgrade torch or use model.attn_implementation=sdpa"
            )
        if not cuda:
            raise ConfigError(
                "model.attn_implementation: varlen is a CUDA kernel and this machine has no GPU. "
                "Use model.attn_implementation=sdpa on CPUs"
            )
    if attn_implementation.startswith("flash_attention"):
        package = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}.get(
            attn_implementation, "flash_attn"
        )
        if not cuda or importlib.util.find_spec(package) is None:
            where = "this machine has no GPU" if not cuda else f"the '{package}' package is not installed"
            raise ConfigError(
                f"model.attn_implementation: {attn_implementation} cannot run: {where}. Use "
                "model.attn_implementation=varlen (PyTorch's own FlashAttention varlen kernel, CUDA) or sdpa (any "
                "device), or pip install flash-attn"
            )
    if use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError(
            "train.use_liger_kernel: true but liger-kernel is not installed. pip install 'sft-exp[gpu]' (or "
            "liger-kernel), or set train.use_liger_kernel=false"
        )
    if use_liger_kernel and not cuda:
        raise ConfigError(
            "train.use_liger_kernel: liger's kernels are Triton GPU kernels and this machine has no GPU. "
            "Set train.use_liger_kernel=false"
        )
