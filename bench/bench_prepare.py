"""Data preparation benchmark: `mode=prepare` cold and warm, a sweep's reuse of the cache, and TRL's own preparation.

    .venv/bin/python bench/bench_prepare.py                   # demo mixture + a 200k-conversation synthetic mixture
    .venv/bin/python bench/bench_prepare.py --rows 20000      # a smaller synthetic mixture

Each sft-exp figure is a real `python launch.py mode=prepare ...` in a fresh process (wall seconds from the command to
its exit, peak RSS of that process). Tokens/s = tokens tokenised / seconds of the tokenise stage (from
mixture_stats.json); a warm run tokenises nothing. TRL's figure is SFTTrainer's own dataset preparation
(`_prepare_dataset`: apply_chat_template per row with assistant masks, then bfd packing) on the same demo rows.
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "sft_exp" / "assets" / "demo"
SOURCES = sorted(p.stem for p in DEMO.glob("*.jsonl"))


def run_prepare(args: list[str], run_dir: Path) -> dict:
    """One `launch.py mode=prepare` in a fresh process: wall seconds, peak RSS (MiB), its mixture stats."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "launch.py"), "mode=prepare", f"hydra.run.dir={run_dir}", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"prepare failed: {proc.stderr.read()[-3000:]}")
    stats = json.loads((run_dir / "mixture_stats.json").read_text())
    return {"wall": wall, "rss_mib": usage.ru_maxrss / 1024, "stats": stats}


def tokens_in_sources(stats: dict) -> int:
    """Tokens of every row that was tokenised (train + held-out, before weighting): what a cold run processes."""
    total = 0
    for s in stats["sources"].values():
        if s["rows"]:
            total += int(s["tokens"] / s["rows"] * (s["rows_in_source"] - s["rows_dropped"]))
    return total


def synthetic_mixture(root: Path, rows: int, seed: int = 0) -> list[str]:
    """rows conversations over the demo's sources: demo rows with their numbers and words re-drawn, so no two agree."""
    rng = random.Random(seed)
    per_source = rows // len(SOURCES)
    overrides = []
    for name in SOURCES:
        base = [json.loads(line) for line in (DEMO / f"{name}.jsonl").read_text().splitlines()]
        out = root / f"{name}.jsonl"
        with out.open("w") as f:
            for i in range(per_source):
                row = json.loads(json.dumps(base[i % len(base)]))
                tag = f" (case {i}-{rng.randint(0, 10**6)})"
                row["messages"][-2 if len(row["messages"]) > 1 else 0]["content"] += tag
                f.write(json.dumps(row) + "\n")
        overrides.append(f"mixture.sources.{name}.path={out}")
    return overrides


def trl_prepare(max_length: int) -> dict:
    """SFTTrainer's own preparation of the same demo rows (conversational, assistant_only_loss, bfd packing)."""
    import datasets
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from sft_exp.config import ASSETS

    datasets.disable_progress_bars()
    datasets.disable_caching()  # or a second bench run times a cache hit of datasets' own map cache
    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny_smollm3")
    ds = datasets.concatenate_datasets(
        [
            datasets.load_dataset("json", data_files=str(DEMO / f"{n}.jsonl"), split="train").select_columns(
                ["messages", "chat_template_kwargs"]
            )
            for n in SOURCES
        ]
    )
    # (TRL renders "Today Date" from the clock instead of a pinned date: a few tokens, the same work.)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ASSETS / "tiny_smollm3"))
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp,
            assistant_only_loss=True,
            packing=True,
            packing_strategy="bfd",
            max_length=max_length,
            report_to=[],
            use_cpu=True,
            bf16=False,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds.select(range(8)), processing_class=tok)
        t0 = time.perf_counter()
        out = trainer._prepare_dataset(ds, tok, args, True, None, "bench")
        seconds = time.perf_counter() - t0
    tokens = sum(len(x) for x in out["input_ids"])
    return {"seconds": seconds, "tokens": tokens, "rows": len(ds), "bins": len(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000, help="conversations in the synthetic mixture (0: skip)")
    ap.add_argument("--num-proc", type=int, default=2, help="mixture.num_proc for the synthetic mixture")
    ap.add_argument("--sweep-runs", type=int, default=3, help="runs in the sweep-amortisation comparison")
    opts = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    fast = ["mixture.test_split_size=32", "packing.max_length=1024"]
    table = []
    try:
        cache = work / "cache-demo"
        cold = run_prepare([*fast, f"cache_dir={cache}"], work / "demo-cold")
        warm = run_prepare([*fast, f"cache_dir={cache}"], work / "demo-warm")
        tok_demo = tokens_in_sources(cold["stats"])
        for label, r in (("demo, cold cache", cold), ("demo, warm cache", warm)):
            s = r["stats"]["seconds"]["tokenise"]
            tps = f"{tok_demo / s:,.0f}" if r is cold else "(cache hit)"
            table.append((label, "sft-exp mode=prepare", tok_demo, s, r["wall"], tps, r["rss_mib"]))
        trl = trl_prepare(1024)
        table.append(
            (
                "demo",
                "TRL SFTTrainer._prepare_dataset",
                trl["tokens"],
                trl["seconds"],
                trl["seconds"],
                f"{trl['tokens'] / trl['seconds']:,.0f}",
                float("nan"),
            )
        )
        if opts.rows:
            syn = synthetic_mixture(work, opts.rows)
            cache = work / "cache-syn"
            extra = [*syn, *fast, f"mixture.num_proc={opts.num_proc}", f"cache_dir={cache}"]
            cold = run_prepare(extra, work / "syn-cold")
            warm = run_prepare(extra, work / "syn-warm")
            tok_syn = tokens_in_sources(cold["stats"])
            for label, r in ((f"synthetic {opts.rows:,} rows, cold", cold), (f"synthetic {opts.rows:,}, warm", warm)):
                s = r["stats"]["seconds"]["tokenise"]
                tps = f"{tok_syn / s:,.0f}" if r is cold else "(cache hit)"
                table.append((label, f"sft-exp (num_proc={opts.num_proc})", tok_syn, s, r["wall"], tps, r["rss_mib"]))

        print("\n### Data preparation (`mode=prepare`)\n")
        print("| input | what | tokens | tokenise s | wall s | tokens/s | peak RSS MiB |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for label, what, tokens, s, wall, tps, rss in table:
            print(f"| {label} | {what} | {tokens:,} | {s:.2f} | {wall:.1f} | {tps} | {rss:.0f} |")

        # Sweep amortisation: N runs with different weights sharing one cache vs N runs each with its own.
        n = opts.sweep_runs
        shared, separate = work / "cache-sweep", work / "cache-sep"
        t_shared = t_sep = 0.0
        for i in range(n):
            w = [f"mixture.sources.{SOURCES[0]}.weight={0.5 + i}"]
            t_shared += run_prepare([*fast, *w, f"cache_dir={shared}"], work / f"sw{i}")["wall"]
            t_sep += run_prepare([*fast, *w, f"cache_dir={separate}/{i}"], work / f"sp{i}")["wall"]
        print(f"\n### Sweep amortisation ({n} runs over `mixture.sources.{SOURCES[0]}.weight`, demo mixture)\n")
        print("| preparation | total wall s |")
        print("|---|---:|")
        print(f"| {n} runs sharing the per-source cache (a sweep) | {t_shared:.1f} |")
        print(f"| {n} runs each tokenising from scratch | {t_sep:.1f} |")
        print(f"\nmachine: {os.cpu_count()} cores; peak RSS is the whole `launch.py` process (Python + torch imports).")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
