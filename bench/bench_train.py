"""Training benchmarks on the tiny default: packed vs unpacked throughput, and framework overhead vs plain TRL.

    .venv/bin/python bench/bench_train.py               # ~5 minutes on 2 cores
    .venv/bin/python bench/bench_train.py --steps 40

1. Throughput: `python launch.py` with packing=ffd and with packing=none (one conversation per row, padded batches of
   the same token budget), the same number of optimizer steps; non-pad tokens/s as TRL counts them (position ids of
   the padding-free row, or the attention mask's ones), from metrics.json.
2. Overhead: wall seconds from the command to the process exit for a run of 1 optimizer step, sft-exp
   (`launch.py`, warm tokenised cache) against a plain TRL script doing the same (bench/plain_trl.py: load the demo
   files, SFTTrainer with assistant_only_loss and bfd packing), each run twice, best kept.
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def launch(run_dir: Path, args: list[str]) -> tuple[float, dict]:
    wall = timed([sys.executable, str(REPO / "launch.py"), f"hydra.run.dir={run_dir}", *args])
    return wall, json.loads((run_dir / "metrics.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    opts = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    cache = work / "cache"
    common = [f"cache_dir={cache}", "eval_before_train=false", "mixture.test_split_size=0", "train.logging_steps=10"]
    try:
        launch(work / "warmup", [*common, "train.max_steps=1"])  # fills the cache, compiles numba
        rows = []
        for label, extra in (
            ("packed (ffd, 1 row of 1024 tokens x 2 accum)", ["packing=ffd"]),
            # ~1024 tokens per micro-batch too: the demo's mean conversation is ~190 tokens
            ("unpacked (padding, 5 conversations x 2 accum)", ["packing=none", "train.per_device_train_batch_size=5"]),
        ):
            wall, m = launch(work / label.split()[0], [*common, *extra, f"train.max_steps={opts.steps}"])
            rows.append((label, m["train_tokens_seen"], m["train_runtime_seconds"], m["train_tokens_per_second"]))
        print(f"\n### Training throughput, tiny default, {opts.steps} optimizer steps\n")
        print("| batches | non-pad tokens | train seconds | non-pad tokens/s |")
        print("|---|---:|---:|---:|")
        for label, tokens, secs, tps in rows:
            print(f"| {label} | {tokens:,} | {secs:.1f} | {tps:,.0f} |")

        ours, plain = [], []
        for i in range(2):
            ours.append(launch(work / f"ours{i}", [*common, "train.max_steps=1"])[0])
            plain.append(timed([sys.executable, str(REPO / "bench" / "plain_trl.py"), "--out", str(work / f"p{i}")]))
        print("\n### Framework overhead: command to exit, 1 optimizer step (best of 2)\n")
        print("| what | wall s |")
        print("|---|---:|")
        print(f"| sft-exp `launch.py` (compose, validate, cached data, ffd, train, save, metrics) | {min(ours):.1f} |")
        print(f"| plain TRL script (load files, SFTTrainer tokenises + bfd packs, train, save) | {min(plain):.1f} |")
        print(f"\nmachine: {os.cpu_count()} cores, CPU only")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
