"""Train the tiny byte-level BPE tokenizer on the demo mixture and write the tiny SmolLM3 config beside it.

Run from the repository root, after ``python scripts/make_demo_data.py``:

    python scripts/make_tiny_model.py                                   # writes sft_exp/assets/tiny_smollm3/
    python scripts/make_tiny_model.py --out /tmp/tiny --data sft_exp/assets/demo

The tokenizer is trained on every demo row rendered through ``sft_exp/assets/templates/smollm3.jinja`` (so the
template's header, personas and tools boilerplate get their own merges), with the control tokens cut out of the
training text so that no merge is spent on them. It is saved as a transformers ``PreTrainedTokenizerFast``
(eos ``<|im_end|>``, pad ``<|pad|>``, no bos) whose chat template is the smollm3 template, together with a
``config.json`` from ``SmolLM3Config``. No weights are saved: the framework builds the model with
``AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(dir))``. Training and the rendering dates are
deterministic, so a rerun writes byte-identical files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, SmolLM3Config
from transformers.utils.chat_template_utils import render_jinja_template

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "sft_exp" / "assets" / "demo"
DEFAULT_OUT = ROOT / "sft_exp" / "assets" / "tiny_smollm3"
TEMPLATE = ROOT / "sft_exp" / "assets" / "templates" / "smollm3.jinja"

VOCAB_SIZE = 4096
# Special tokens get the first ids, in this order. The chat-role markers and the pad token are "special" (dropped by
# decode(skip_special_tokens=True)); the think and tool-call tags are single-id added tokens that decode keeps, so a
# generated reasoning block or tool call survives decoding.
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<|pad|>"]
KEPT_ON_DECODE = {"<think>", "</think>", "<tool_call>", "</tool_call>"}
CONTROL_RE = re.compile("|".join(re.escape(token) for token in SPECIAL_TOKENS))

MODEL_KWARGS: dict[str, Any] = {
    "num_hidden_layers": 4,
    "hidden_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 512,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}


def load_rows(data_dir: Path) -> dict[str, list[dict[str, Any]]]:
    sources: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(data_dir.glob("*.jsonl")):
        with path.open(encoding="utf-8") as handle:
            sources[path.stem] = [json.loads(line) for line in handle if line.strip()]
    if not sources:
        raise SystemExit(f"no *.jsonl files in {data_dir}: run scripts/make_demo_data.py first")
    return sources


def date_for(index: int) -> str:
    """A deterministic spread of dates, so every month name and day number shows up in the training text."""
    return (dt.date(2025, 1, 1) + dt.timedelta(days=(index * 37) % 1095)).strftime("%d %B %Y")


def render_all(sources: dict[str, list[dict[str, Any]]], template: str) -> dict[str, list[str]]:
    rendered: dict[str, list[str]] = {}
    index = 0
    for name, rows in sources.items():
        texts = []
        for item in rows:
            kwargs = dict(item.get("chat_template_kwargs") or {})
            kwargs.setdefault("date_string", date_for(index))
            index += 1
            out, _ = render_jinja_template([item["messages"]], chat_template=template, **kwargs)
            texts.append(out[0])
        rendered[name] = texts
    return rendered


def training_pieces(texts: list[str]) -> Iterator[str]:
    """The rendered text with the control tokens cut out (BPE training does not split on added tokens)."""
    for text in texts:
        for piece in CONTROL_RE.split(text):
            if piece:
                yield piece


def train_tokenizer(texts: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_pieces(texts), trainer=trainer)
    # Mark the think / tool-call tags non-special: still one id each, still split out of any text, but kept by decode.
    spec = json.loads(tokenizer.to_str())
    for added in spec["added_tokens"]:
        if added["content"] in KEPT_ON_DECODE:
            added["special"] = False
    return Tokenizer.from_str(json.dumps(spec))


def build(data_dir: Path, out_dir: Path) -> None:
    template = TEMPLATE.read_text(encoding="utf-8")
    sources = load_rows(data_dir)
    rendered = render_all(sources, template)
    all_texts = [text for texts in rendered.values() for text in texts]
    backend = train_tokenizer(all_texts)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        bos_token=None,
        unk_token=None,
        model_max_length=MODEL_KWARGS["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = template
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)

    config = SmolLM3Config(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["SmolLM3ForCausalLM"],
        **MODEL_KWARGS,
    )
    config.save_pretrained(out_dir)
    check(out_dir, rendered)


def check(out_dir: Path, rendered: dict[str, list[str]]) -> None:
    """Reload from disk (offline), check the special tokens and the template round trip, and print a summary."""
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    config = AutoConfig.from_pretrained(out_dir)
    for token in SPECIAL_TOKENS:
        ids = tokenizer.encode(token, add_special_tokens=False)
        assert len(ids) == 1, f"{token} is not a single id: {ids}"
    assert tokenizer.chat_template is not None and tokenizer.chat_template == TEMPLATE.read_text(encoding="utf-8")
    assert config.vocab_size == len(tokenizer) and config.eos_token_id == tokenizer.eos_token_id

    print(
        f"tokenizer: {len(tokenizer)} ids (asked for {VOCAB_SIZE}), eos={tokenizer.eos_token_id}, "
        f"pad={tokenizer.pad_token_id}, bos={tokenizer.bos_token_id}"
    )
    for name, texts in rendered.items():
        lengths = [len(tokenizer.encode(text, add_special_tokens=False)) for text in texts]
        assert all(tokenizer.decode(tokenizer.encode(t, add_special_tokens=False)) == t for t in texts[:50])
        print(f"  {name:8s} rows={len(texts):5d} mean_tokens={sum(lengths) / len(lengths):6.1f} max={max(lengths)}")

    sample = json.loads(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}))["messages"]
    text = tokenizer.apply_chat_template(sample, tokenize=False, add_generation_prompt=True, date_string="01 May 2026")
    assert isinstance(text, str) and text.endswith("<|im_start|>assistant\n")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    print(f"model: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters (tied embeddings)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="demo data directory (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    args = parser.parse_args(argv)
    build(args.data, args.out)


if __name__ == "__main__":
    main()
