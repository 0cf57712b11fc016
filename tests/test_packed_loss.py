"""No cross-contamination: a packed row's loss equals the token-weighted mean of its sequences' separate losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sft_exp.config import ASSETS, ConfigError
from sft_exp.config.preflight import check_attention
from sft_exp.train.attention import cu_seqlens_from_position_ids, register
from sft_exp.train.collator import IGNORE, PackedCollator


def _tiny_model(attn: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(ASSETS / "tiny_smollm3")
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    return model.eval()


def _sequences(n: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for length in (37, 120, 64, 9)[:n]:
        ids = rng.integers(7, 4000, size=length).astype(np.int32)
        mask = (rng.random(length) < 0.6).astype(np.int8)
        out.append((ids, mask))
    return out


def _row(seqs: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    return {
        "input_ids": np.concatenate([s[0] for s in seqs]),
        "loss_mask": np.concatenate([s[1] for s in seqs]),
        "seq_lengths": [len(s[0]) for s in seqs],
        "seq_sources": list(range(len(seqs))),
    }


def test_collator_restarts_positions_and_masks_sequence_starts() -> None:
    seqs = _sequences()
    batch = PackedCollator(pad_token_id=6)([_row(seqs[:2]), _row(seqs[2:])])
    pos, labels, src = batch["position_ids"][0], batch["labels"][0], batch["source_ids"][0]
    lengths = [len(s[0]) for s in seqs]
    starts = np.cumsum([0, *lengths[:-1]])
    assert batch["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in batch
    for s, n in zip(starts, lengths):
        assert pos[s : s + n].tolist() == list(range(n))
        assert labels[s] == IGNORE  # never trained to follow the previous sequence
    ids = batch["input_ids"][0]
    mask = torch.as_tensor(np.concatenate([s[1] for s in seqs]), dtype=torch.bool)
    mask[torch.as_tensor(starts)] = False
    assert torch.equal(labels != IGNORE, mask) and torch.equal(labels[mask], ids[mask])
    assert src.tolist() == [0] * lengths[0] + [1] * lengths[1] + [0] * lengths[2] + [1] * lengths[3]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_token_weighted_mean_of_separate_losses(attn: str) -> None:
    model = _tiny_model(attn)
    seqs = _sequences()
    collate = PackedCollator(pad_token_id=6)
    packed = collate([_row(seqs)])
    with torch.no_grad():
        # use_cache=False: with a cache object transformers skips packed-sequence detection and attends across
        # sequences (stack-notes); the Trainer passes it too.
        out = model(
            input_ids=packed["input_ids"],
            position_ids=packed["position_ids"],
            labels=packed["labels"],
            use_cache=False,
        )
        total, count = 0.0, 0
        for s in seqs:
            one = collate([_row([s])])
            logits = model(input_ids=one["input_ids"], position_ids=one["position_ids"], use_cache=False).logits
            lab = one["labels"][0, 1:]
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], lab, ignore_index=IGNORE, reduction="sum")
            total += float(nll)
            count += int((lab != IGNORE).sum())
    assert abs(float(out.loss) - total / count) < 1e-5


def test_without_position_ids_the_packed_row_would_leak() -> None:
    """The control: the same row as one plain causal sequence gives a different loss, so the test above can fail."""
    model = _tiny_model("sdpa")
    seqs = _sequences()
    packed = PackedCollator(pad_token_id=6)([_row(seqs)])
    with torch.no_grad():
        isolated = model(**{k: packed[k] for k in ("input_ids", "position_ids", "labels")}, use_cache=False).loss
        leaky = model(input_ids=packed["input_ids"], labels=packed["labels"], use_cache=False).loss
    assert abs(float(isolated) - float(leaky)) > 1e-3


def test_varlen_boundaries_from_position_ids() -> None:
    """attn_implementation=varlen cuts the packed row where position_ids restart (a leading continuation counts)."""
    cu, longest = cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
    assert cu.tolist() == [0, 3, 5, 9] and cu.dtype == torch.int32 and longest == 4
    cu, longest = cu_seqlens_from_position_ids(torch.tensor([5, 6, 0, 1]))
    assert cu.tolist() == [0, 2, 4] and longest == 2


def test_varlen_refused_on_a_cpu() -> None:
    with pytest.raises(ConfigError, match="varlen is a CUDA kernel"):
        check_attention("varlen", use_liger_kernel=False, cuda=False)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["varlen", "flash_attention_2"])
def test_flash_attention_varlen_matches_separate_losses(impl: str) -> None:
    """Packed bf16 loss with a varlen kernel = the same loss with sdpa's block-diagonal mask (same row, same GPU)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if impl == "flash_attention_2":
        pytest.importorskip("flash_attn")
    register()
    model = _tiny_model(impl).to("cuda", torch.bfloat16)
    seqs = _sequences()
    packed = {k: v.cuda() for k, v in PackedCollator(pad_token_id=6)([_row(seqs)]).items() if k != "source_ids"}
    with torch.no_grad():
        loss = model(**packed, use_cache=False).loss
        model.config._attn_implementation = "sdpa"
        ref = model(**packed, use_cache=False).loss
        leaky = model(input_ids=packed["input_ids"], labels=packed["labels"], use_cache=False).loss
    assert abs(float(loss) - float(ref)) < 2e-2
    assert abs(float(leaky) - float(ref)) > 5e-2  # the check can fail: without boundaries the loss differs
