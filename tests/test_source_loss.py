"""The per-source training loss comes from the training forward pass itself and equals a separate computation."""

from __future__ import annotations

import numpy as np
import torch

from sft_exp.config import ASSETS
from sft_exp.train.collator import IGNORE, PackedCollator
from sft_exp.train.trainer import SourceAwareSFTTrainer


def test_per_source_loss_and_trained_tokens_match_a_separate_forward(tmp_path) -> None:
    import datasets
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny_smollm3")
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ASSETS / "tiny_smollm3"))
    rng = np.random.default_rng(1)
    lens = [30, 50, 20, 40]
    row = {
        "input_ids": rng.integers(7, 4000, sum(lens)).tolist(),
        "loss_mask": (rng.random(sum(lens)) < 0.5).astype(int).tolist(),
        "seq_lengths": lens,
        "seq_sources": [0, 1, 1, 0],
    }
    ds = datasets.Dataset.from_list([row])
    args = SFTConfig(
        output_dir=str(tmp_path),
        report_to=[],
        bf16=False,
        use_cpu=True,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer = SourceAwareSFTTrainer(
        model=model,
        args=args,
        data_collator=PackedCollator(tok.pad_token_id),
        train_dataset=ds,
        processing_class=tok,
        source_names=["a", "b"],
    )
    batch = PackedCollator(tok.pad_token_id)([row])
    trainer.model.train()
    trainer.compute_loss(trainer.model, dict(batch))
    got = (trainer._src_sum / trainer._src_cnt).tolist()

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    labels, src = batch["labels"][0, 1:], batch["source_ids"][0, 1:]
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], labels, ignore_index=IGNORE, reduction="none")
    for i in (0, 1):
        keep = (labels != IGNORE) & (src == i)
        assert abs(got[i] - float(nll[keep].mean())) < 1e-4
        assert int(trainer.trained_tokens_by_source[i]) == int(keep.sum())
