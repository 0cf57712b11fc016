"""Memory of tokenising unique text: RSS growth of sft-exp's piece tokeniser over a tokenising worker's life.

    .venv/bin/python bench/bench_tokenise_memory.py                 # 600 batches of 64 rows (~60M tokens)
    .venv/bin/python bench/bench_tokenise_memory.py --batches 200

Not a test. Rows are a fixed system header plus 200-800 random words each (seeded), so nearly every row's content is
a piece seen once, as in real conversation data; `PieceTokenizer.encode` (sft_exp/data/fast_render.py) runs on batches
of 64 with the tiny tokenizer. The growth is measured from batch 20 on (after the caches and allocator warm up) and
printed per token: what a `datasets` map worker of a cold `mode=prepare` adds per token it tokenises. Session 5:
~48 B/token before (every piece seen once kept, with the list of its words), 0.3 B/token after.
"""

from __future__ import annotations

import argparse
import random
import time

from transformers import AutoTokenizer

from sft_exp.config import ASSETS
from sft_exp.data.fast_render import piece_tokenizer


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=600)
    a = ap.parse_args()
    pt = piece_tokenizer(AutoTokenizer.from_pretrained(str(ASSETS / "tiny_smollm3")))
    words = (ASSETS / "demo" / "arith.jsonl").read_text().split()[:5000] + [f"w{i}" for i in range(20000)]
    rng = random.Random(0)
    header = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    tokens = base_tokens = base = 0
    started = time.time()
    for b in range(a.batches):
        texts = [header + " ".join(rng.choices(words, k=rng.randint(200, 800))) + "<|im_end|>\n" for _ in range(64)]
        tokens += len(pt.encode(texts)[0])
        if b == 20:
            base, base_tokens = rss(), tokens
    grown = rss() - base
    print("| batches | tokens | seconds | RSS growth after warm-up | bytes per token | piece cache entries |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {a.batches} | {tokens:,} | {time.time() - started:.1f} | {grown / 2**20:,.0f} MiB "
          f"| {grown / max(1, tokens - base_tokens):.2f} | {len(pt.cache):,} |")  # fmt: skip


if __name__ == "__main__":
    main()
