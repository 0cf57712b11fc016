"""What a user would otherwise run: a plain TRL script training the tiny model on the demo files (bench baseline).

.venv/bin/python bench/plain_trl.py --out /tmp/plain --steps 1
"""

from __future__ import annotations

import argparse

import datasets
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from sft_exp.config import ASSETS

SOURCES = ["arith", "count", "reverse", "sort", "tools", "units"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=1)
    opts = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny_smollm3")
    ds = datasets.concatenate_datasets(
        [
            datasets.load_dataset("json", data_files=str(ASSETS / "demo" / f"{n}.jsonl"), split="train").select_columns(
                ["messages", "chat_template_kwargs"]
            )
            for n in SOURCES
        ]
    )
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ASSETS / "tiny_smollm3"))
    args = SFTConfig(
        output_dir=opts.out,
        max_steps=opts.steps,
        learning_rate=3e-3,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        assistant_only_loss=True,
        packing=True,
        packing_strategy="bfd",
        max_length=1024,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()
    trainer.save_model(opts.out)


if __name__ == "__main__":
    main()
