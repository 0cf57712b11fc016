"""Packed rows -> model inputs: TRL's padding-free collator, plus the source of every token (per-source loss).

Rows arrive packed by sft_exp.data.pipeline: `input_ids`, `loss_mask` (1 = trained), `seq_lengths` (the sequences
laid end to end in the row) and `seq_sources` (each sequence's source index). (Not `assistant_masks`: TRL refuses that
column without `labels` when dataset preparation is skipped, as it is here.) TRL's
DataCollatorForLanguageModeling(padding_free=True) flattens the batch into one row, restarts `position_ids` at every
sequence (attention never crosses a boundary), masks each sequence's first label and emits the varlen boundaries
(`cu_seq_lens_*`, `max_length_*`). This subclass turns the assistant mask into labels and adds `source_ids`.

    row: seq_lengths [3, 2], loss_mask [0 1 1 0 1], seq_sources [0, 1]
    ->   input_ids [[a b c d e]]  position_ids [[0 1 2 0 1]]  labels [[-100 b c -100 e]]  source_ids [[0 0 0 1 1]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

IGNORE = -100


@dataclass
class PackedCollator(DataCollatorForLanguageModeling):
    """TRL's collator for rows carrying `loss_mask` and `seq_sources`; `padding_free=False` pads (packing=none).

    Example:
        >>> c = PackedCollator(pad_token_id=0, padding_free=True)
        >>> row = {"input_ids": [5, 6, 7, 8, 9], "loss_mask": [0, 1, 1, 0, 1], "seq_lengths": [3, 2],
        ...        "seq_sources": [0, 1]}
        >>> c([row])["labels"].tolist(), c([row])["source_ids"].tolist()
        ([[-100, 6, 7, -100, 9]], [[0, 0, 0, 1, 1]])
    """

    padding_free: bool = True  # TRL's default is False; packed rows are always flattened unless packing=none

    def __post_init__(self) -> None:
        self.return_position_ids = True  # padded batches too: the per-sequence restart is what the model sees

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        rows, sources = [], []
        for r in examples:
            ids = np.asarray(r["input_ids"], dtype=np.int64)
            lens = np.asarray(r["seq_lengths"], dtype=np.int64)
            labels = np.where(np.asarray(r["loss_mask"], dtype=bool), ids, IGNORE)
            labels[np.cumsum(lens) - lens] = IGNORE  # no sequence is trained to follow the previous one
            rows.append({"input_ids": ids, "labels": labels, "seq_lengths": r["seq_lengths"]})
            sources.append(torch.from_numpy(np.repeat(np.asarray(r["seq_sources"], dtype=np.int64), lens)))
        out = super().torch_call(rows)
        if self.padding_free:
            out["source_ids"] = torch.cat(sources)[None]
        else:
            width = out["input_ids"].shape[1]
            out["source_ids"] = torch.stack(
                [torch.nn.functional.pad(s, (0, width - len(s)), value=-1) for s in sources]
            )
        return out


def attention_pairs(inputs: dict[str, Any]) -> float:
    """Sum over the batch's sequences of s * (s + 1): the attention term of the training FLOPs
    (6 * n_layers * d_attn * this, causal, document-masked; sft_exp.train.tracking.train_flops). Padding-free batches:
    the collator's `cu_seq_lens_q`; padded ones: one sequence per row, its attention_mask length."""
    if inputs.get("cu_seq_lens_q") is not None:
        lens = inputs["cu_seq_lens_q"].diff()
    elif inputs.get("attention_mask") is not None:
        lens = inputs["attention_mask"].sum(-1).reshape(-1)
    else:
        ids = inputs["input_ids"]
        lens = torch.full((ids.shape[0],), ids.shape[-1], device=ids.device)
    lens = lens.double()
    return float((lens * (lens + 1)).sum())
