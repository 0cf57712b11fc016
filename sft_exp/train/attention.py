"""`model.attn_implementation=varlen`: FlashAttention varlen through the kernel PyTorch itself ships, no flash-attn.

Why: packed rows need attention that stops at every sequence boundary. `flash_attention_2` does this with the
flash-attn package, which has no wheels on PyPI (a source build takes an hour and must match the torch/CUDA pair), and
`sdpa` does it with a dense (rows, 1, L, L) boolean mask, which at L=64k is 4 GiB per row and runs the slower
memory-efficient kernel over every masked block. PyTorch (>= 2.9) bundles the FlashAttention-2 varlen kernel as
`torch.nn.attention.varlen.varlen_attn`: this module registers it with transformers' AttentionInterface under the
name ``varlen``, so any model with `_supports_attention_backend` (Llama, SmolLM3, Qwen, Mistral, ...) runs it.

The sequence boundaries come from `position_ids` (the packed collator restarts them at 0 for every sequence), as
transformers does for flash_attention_2: cu_seqlens = indices where position_ids == 0, plus the total. They are
computed once per forward (the same position_ids tensor reaches every layer) and cached on that tensor.
CUDA only (the kernel has no CPU implementation): `check_attention` refuses it on a CPU before anything is written.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from sft_exp.config.preflight import VARLEN as NAME
from sft_exp.config.preflight import varlen_available

_boundaries: dict[str, Any] = {"ref": None, "value": None}


available = varlen_available  # torch >= 2.9 ships the kernel


def cu_seqlens_from_position_ids(position_ids: Any) -> tuple[Any, int]:
    """(cu_seqlens int32 [n+1], longest sequence) of the sequences laid end to end in `position_ids` ([1, L] or [L]).

    A sequence starts wherever position_ids is 0 (and at index 0, whatever its value, as a continuation).
    """
    pos = position_ids.reshape(-1)
    total = pos.numel()
    starts = torch.nonzero(pos == 0, as_tuple=False).reshape(-1)
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    cu = torch.cat([starts, starts.new_full((1,), total)]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return cu, longest


def _cached_boundaries(position_ids: Any) -> tuple[Any, int]:
    ref = _boundaries["ref"]
    if ref is not None and ref() is position_ids:
        return _boundaries["value"]
    value = cu_seqlens_from_position_ids(position_ids)
    _boundaries["ref"], _boundaries["value"] = weakref.ref(position_ids), value
    return value


def varlen_attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers attention function: q/k/v [batch, heads, L, head_dim] -> ([batch, L, heads, head_dim], None)."""
    from torch.nn.attention.varlen import varlen_attn

    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise ValueError(
            "attn_implementation=varlen takes packed rows without padding (position_ids restarting per sequence); "
            "this batch has a padding mask. Use packing (packing=ffd, not packing=none) or attn_implementation=sdpa"
        )
    if dropout:
        raise ValueError("attn_implementation=varlen has no attention dropout; set the model's attention_dropout=0")
    batch, heads, length, head_dim = query.shape
    position_ids = kwargs.get("position_ids")
    if position_ids is None:  # one plain sequence per row
        position_ids = torch.arange(length, device=query.device).repeat(batch)
    cu, longest = _cached_boundaries(position_ids)
    q = query.transpose(1, 2).reshape(batch * length, heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], head_dim)
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], head_dim)
    params = inspect.signature(varlen_attn).parameters
    extra: dict[str, Any] = {}
    if key.shape[1] != heads:  # grouped-query attention
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:  # older torch: expand the kv heads
            k = k.repeat_interleave(heads // key.shape[1], dim=1)
            v = v.repeat_interleave(heads // value.shape[1], dim=1)
    if sliding_window:
        raise ValueError("attn_implementation=varlen: sliding-window layers are not supported; use flash_attention_2")
    if "is_causal" in params:
        extra["is_causal"] = True
    else:
        extra["window_size"] = (-1, 0)  # torch >= 2.10 spells causal as the window (-1, 0)
    if "scale" in params:
        extra["scale"] = scaling
    out = varlen_attn(q, k, v, cu, cu, longest, longest, **extra)
    return out.reshape(batch, length, heads, head_dim), None


def register() -> None:
    """Make `attn_implementation="varlen"` known to transformers (idempotent; a no-op where torch lacks the kernel)."""
    if not available():
        return

    AttentionInterface.register(NAME, varlen_attention_forward)
    # No 4D mask: like flash attention, the kernel takes the boundaries, not a mask.
    AttentionMaskInterface.register(NAME, flash_attention_mask)
