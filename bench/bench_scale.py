"""Scale benchmark: memory and time of `mode=prepare` (cold, warm) and a short training run on smoltalk2-shaped data.

    .venv/bin/python bench/bench_scale.py                          # 0.5% and 2% of the recipe, 1 rank
    .venv/bin/python bench/bench_scale.py --scales 0.005 0.02 --ranks 2    # + a local 2-rank training run per scale
    .venv/bin/python bench/bench_scale.py --scales 0.02 --keep /tmp/scale  # keep the generated data and runs

For each scale the recipe's 25 smoltalk2 splits (bench/data/smoltalk2_sft_split_stats.tsv) are written as jsonl files:
each split gets round(rows x recipe weight x scale) conversations (>= 4), each conversation's token length drawn from
a lognormal around the split's mean (--sigma), filled with English words (a Zipf draw from the word list of the demo
data, sentence-cased and punctuated; think splits get a <think> block), calibrated against the tiny tokenizer so the
rendered conversation has about the drawn length. A mixture YAML (every source weight 1: the recipe weights are in the
row counts) goes into a --config-dir. Then, each a fresh `python launch.py` process:

    prepare cold   mode=prepare packing.max_length=65536, empty cache (tokenises every source)
    prepare warm   the same, cache hit
    train          train.max_steps=2 (one 4,096-token row a step) packing.max_length=4096, warm cache,
                   eval_before_train=false
    train xN       the same with distributed=ddp distributed.processes_per_node=N (--ranks N): per-rank figures

Reported per run: wall seconds, tokens/s (prepare: tokenised tokens / wall; train: the Trainer's tokens/s), peak RSS
of the main process (ru_maxrss) and the peaks of RssAnon / RssFile sampled from /proc/<pid>/status every 50 ms
(for a multi-rank run: the largest rank). Between the two largest scales: the slope of each in bytes per token
(tokens = the tokens of every tokenised row), the intercept (the base process), and a projection to the full recipe
(100%: one preparing process; a 16-core node with 8 ranks: 8 x the anonymous memory of a rank + the file-backed pages
once, since ranks map the same cache files and share those pages).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TSV = REPO / "bench" / "data" / "smoltalk2_sft_split_stats.tsv"
DEMO = REPO / "sft_exp" / "assets" / "demo"
MIB = 1 << 20
# The short training run: 2 optimizer steps of one 4,096-token packed row each (the machine is a 2-core CPU).
TRAIN = ["train.max_steps=2", "train.gradient_accumulation_steps=1", "packing.max_length=4096"]
TRAIN += ["eval_before_train=false", "train.logging_steps=1"]


# ------------------------------------------------------------------------------------------------------- the data
def word_list() -> tuple[np.ndarray, np.ndarray]:
    """English words of the demo data with Zipf weights by their frequency rank (most frequent first)."""
    counts: Counter[str] = Counter()
    for p in sorted(DEMO.glob("*.jsonl")):
        for line in p.read_text().splitlines():
            for m in json.loads(line)["messages"]:
                counts.update(re.findall(r"[a-z]{2,}", (m.get("content") or "").lower()))
    words = np.array([w for w, _ in counts.most_common()])
    weights = 1.0 / np.arange(1, len(words) + 1)
    return words, weights / weights.sum()


class TextMaker:
    """Sentences of sampled words; `tokens_per_word` calibrated against the tokenizer."""

    def __init__(self, seed: int) -> None:
        self.words, self.p = word_list()
        self.rng = np.random.default_rng(seed)
        self.tokens_per_word = 1.0

    def text(self, n_words: int) -> str:
        n_words = max(1, int(n_words))
        w = self.words[self.rng.choice(len(self.words), n_words, p=self.p)].astype(object)
        ends = np.flatnonzero(self.rng.random(n_words) < 1 / 12)  # ~12 words a sentence
        w[ends] = w[ends] + "."
        starts = np.concatenate(([0], ends[ends + 1 < n_words] + 1))
        w[starts] = [s.capitalize() for s in w[starts]]
        return " ".join(w)

    def calibrate(self, tokenizer: Any) -> None:
        sample = self.text(20_000)
        self.tokens_per_word = len(tokenizer(sample)["input_ids"]) / 20_000


def conversation(maker: TextMaker, tokens: int, think: bool, rng: np.random.Generator) -> dict[str, Any]:
    """A conversation of about `tokens` tokens once rendered (template overhead ~40 tokens + ~6 per turn)."""
    turns = 1 if tokens < 1500 else 2 if tokens < 6000 else 3
    budget = max(8, tokens - 40 - 12 * turns) / maker.tokens_per_word
    msgs: list[dict[str, Any]] = []
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": maker.text(min(60, budget * 0.05))})
    for _ in range(turns):
        user = budget / turns * 0.2
        msgs.append({"role": "user", "content": maker.text(user)})
        answer = maker.text(budget / turns - user)
        if think:
            answer = f"<think>\n{maker.text(budget / turns * 0.3)}\n</think>\n{answer}"
        msgs.append({"role": "assistant", "content": answer})
    return {"messages": msgs, "chat_template_kwargs": {"enable_thinking": think}}


def source_name(split: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", split.lower()).strip("_")


def generate(root: Path, scale: float, sigma: float, seed: int) -> tuple[Path, int]:
    """The jsonl files and a config dir holding mixture/bench.yaml; returns (config dir, conversations)."""
    from transformers import AutoTokenizer

    maker = TextMaker(seed)
    maker.calibrate(AutoTokenizer.from_pretrained(REPO / "sft_exp" / "assets" / "tiny_smollm3"))
    data, conf = root / "data", root / "conf" / "mixture"
    data.mkdir(parents=True, exist_ok=True)
    conf.mkdir(parents=True, exist_ok=True)
    lines, total = ["sources:"], 0
    with TSV.open() as f:
        for j, row in enumerate(csv.DictReader(f, delimiter="\t")):
            n = max(4, round(float(row["rows"]) * float(row["recipe_weight"]) * scale))
            rng = np.random.default_rng([seed, j])
            mu = math.log(float(row["mean_tokens_per_row"])) - sigma**2 / 2  # lognormal mean = exp(mu + s^2/2)
            lengths = np.clip(rng.lognormal(mu, sigma, n).round(), 64, 131_072).astype(int)
            think = row["split"].endswith("_think") and not row["split"].endswith("no_think")
            name = source_name(row["split"])
            path = data / f"{name}.jsonl"
            with path.open("w") as out:
                for length in lengths.tolist():
                    out.write(json.dumps(conversation(maker, length, think, rng)) + "\n")
            lines += [f"  {name}:", f"    path: {path}", "    weight: 1.0"]
            total += n
    lines += ["weighting: fraction", "seed: 0", "test_split_size: 2", "on_bad_rows: error", "num_proc: 2"]
    (conf / "bench.yaml").write_text("\n".join(lines) + "\n")
    return root / "conf", total


# ---------------------------------------------------------------------------------------------------- measuring
def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def run_launch(args: list[str], cwd: Path, label: str) -> dict[str, Any]:
    """One `python launch.py args` in a fresh process, sampled every 50 ms: wall s, ru_maxrss, peak anon/file per
    process (the main process and each descendant, e.g. ranks); names whose cmdline says `rank` are ranks."""
    t0 = time.perf_counter()
    log = cwd / f"{label}.log"
    with log.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "launch.py"), *args],
            cwd=cwd,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        )
    peaks: dict[int, dict[str, int]] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for pid in [proc.pid, *_descendants(proc.pid)]:
                s = _status(pid)
                p = peaks.setdefault(pid, {})
                for k, v in s.items():
                    p[k] = max(p.get(k, 0), v)
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    th.join()
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{label} failed (exit {os.waitstatus_to_exitcode(status)}):\n{log.read_text()[-4000:]}")
    main = peaks.get(proc.pid, {})
    others = [v for pid, v in peaks.items() if pid != proc.pid and v.get("VmRSS", 0) > 200 * MIB]
    return {"wall": wall, "maxrss": usage.ru_maxrss * 1024, "main": main, "children": others}


def tokens_in_sources(stats: dict[str, Any]) -> int:
    """Tokens of every tokenised row (train + held out, before weighting; every weight is 1 here)."""
    total = 0
    for s in stats["sources"].values():
        if s["rows"]:
            total += round(s["tokens"] / s["rows"] * (s["rows_in_source"] - s["rows_dropped"]))
    return total


def measure(scale: float, work: Path, sigma: float, ranks: int) -> dict[str, Any]:
    root = work / f"scale-{scale:g}"
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    conf, conversations = generate(root, scale, sigma, seed=0)
    print(f"[{scale:.2%}] {conversations:,} conversations generated in {time.perf_counter() - t0:.0f} s", flush=True)
    cache = root / "cache"
    base = ["--config-dir", str(conf), "mixture=bench", f"cache_dir={cache}"]
    prep = [*base, "mode=prepare", "packing.max_length=65536"]
    out: dict[str, Any] = {"scale": scale, "conversations": conversations}
    for label, args in (
        ("prepare_cold", prep),
        ("prepare_warm", prep),
        (
            "train",
            [*base, *TRAIN],
        ),
    ):
        r = run_launch([*args, f"hydra.run.dir={root / label}"], root, label)
        out[label] = r
        if label == "prepare_cold":
            out["tokens"] = tokens_in_sources(json.loads((root / label / "mixture_stats.json").read_text()))
            out["tokenise_s"] = json.loads((root / label / "mixture_stats.json").read_text())["seconds"]["tokenise"]
        if label == "train":
            r["tokens_per_s"] = json.loads((root / label / "metrics.json").read_text())["train_tokens_per_second"]
        print(f"[{scale:.2%}] {label}: {summary(r)}", flush=True)
    if ranks > 1:
        label = f"train_x{ranks}"
        args = [*base, *TRAIN]
        args += ["distributed=ddp", f"distributed.processes_per_node={ranks}", f"hydra.run.dir={root / label}"]
        r = run_launch(args, root, label)
        r["tokens_per_s"] = json.loads((root / label / "metrics.json").read_text())["train_tokens_per_second"]
        out[label] = r
        print(f"[{scale:.2%}] {label}: {summary(r)}", flush=True)
    return out


def summary(r: dict[str, Any]) -> str:
    m = r["main"]
    s = f"wall {r['wall']:.1f} s, ru_maxrss {r['maxrss'] / MIB:,.0f} MiB, anon {m.get('RssAnon', 0) / MIB:,.0f} MiB"
    s += f", file {m.get('RssFile', 0) / MIB:,.0f} MiB"
    if r["children"]:  # ranks, or datasets' map workers of a cold prepare
        c = max(r["children"], key=lambda p: p.get("VmRSS", 0))
        s += f"; {len(r['children'])} child processes, largest: rss {c.get('VmRSS', 0) / MIB:,.0f} MiB"
        s += f" anon {c.get('RssAnon', 0) / MIB:,.0f} MiB file {c.get('RssFile', 0) / MIB:,.0f} MiB"
    return s


def figures(r: dict[str, Any], ranked: bool) -> dict[str, float]:
    """The figures of one run: the main process's sampled peaks; a multi-rank run: the largest rank (the launcher
    prepared the data itself). `child`: the largest other process (datasets' map workers of a cold prepare, ranks).
    (ru_maxrss is not used for the main process: wait4 folds the children's peaks into it.)"""
    procs = r["children"] if ranked and r["children"] else [r["main"]]
    pick = max(procs, key=lambda p: p.get("VmRSS", 0))
    child = max((c.get("VmRSS", 0) for c in r["children"]), default=0)
    return {"rss": pick.get("VmRSS", 0), "anon": pick.get("RssAnon", 0), "file": pick.get("RssFile", 0), "child": child}


# ---------------------------------------------------------------------------------------------------- reporting
def report(results: list[dict[str, Any]], ranks: int) -> str:
    recipe = sum(float(r["rows"]) * float(r["recipe_weight"]) * float(r["mean_tokens_per_row"]) for r in _tsv())
    labels = ["prepare_cold", "prepare_warm", "train"] + ([f"train_x{ranks}"] if ranks > 1 else [])
    lines = [
        "| scale | run | tokens | wall s | tokens/s | peak RSS MiB | RssAnon MiB | RssFile MiB | largest child MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        for label in labels:
            r = res[label]
            f = figures(r, label.startswith("train_x"))
            tps = r.get("tokens_per_s") or (res["tokens"] / r["wall"] if label == "prepare_cold" else None)
            name = label + (" (per rank, largest)" if label.startswith("train_x") else "")
            lines.append(
                f"| {res['scale']:.2%} | {name} | {res['tokens']:,} | {r['wall']:.1f} | "
                f"{f'{tps:,.0f}' if tps else ''} | {f['rss'] / MIB:,.0f} | {f['anon'] / MIB:,.0f} | "
                f"{f['file'] / MIB:,.0f} | {format(f['child'] / MIB, ',.0f') if f['child'] else ''} |"
            )
    if len(results) >= 2:
        a, b = results[-2], results[-1]
        dt = b["tokens"] - a["tokens"]
        lines += [
            "",
            f"Slope between {a['scale']:.2%} and {b['scale']:.2%} ({dt:,} tokens apart), bytes per token; "
            f"projection to the full recipe ({recipe / 1e9:.2f}B tokens, bytes/token x tokens + intercept):",
            "",
            "| run | RSS B/token | anon B/token | file B/token | anon intercept MiB | anon at 10% above base GiB "
            "| RSS at 100% GiB | anon at 100% GiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        node = {}
        for label in labels:
            fa, fb = figures(a[label], label.startswith("train_x")), figures(b[label], label.startswith("train_x"))
            slope = {k: (fb[k] - fa[k]) / dt for k in fa}
            icpt = fb["anon"] - slope["anon"] * b["tokens"]
            # a negative slope is noise (nothing shrinks with more tokens): projected as flat
            full = {k: fb[k] + max(0.0, slope[k]) * (recipe - b["tokens"]) for k in fb}
            node[label] = full
            above = max(0.0, slope["anon"]) * recipe * 0.1 / 2**30
            lines.append(
                f"| {label} | {slope['rss']:.2f} | {slope['anon']:.2f} | {slope['file']:.2f} | {icpt / MIB:,.0f} | "
                f"{above:.2f} | {full['rss'] / 2**30:.1f} | {full['anon'] / 2**30:.1f} |"
            )
        t = node.get(f"train_x{ranks}", node["train"])
        lines += [
            "",
            f"16-core node, 8 ranks, full recipe: 8 x {t['anon'] / 2**30:.1f} GiB anonymous + "
            f"{t['file'] / 2**30:.1f} GiB file-backed (shared page cache, once) = "
            f"{(8 * t['anon'] + t['file']) / 2**30:.1f} GiB; the preparing process before it: "
            f"{node['prepare_cold']['rss'] / 2**30:.1f} GiB.",
        ]
    return "\n".join(lines)


def _tsv() -> list[dict[str, str]]:
    with TSV.open() as f:
        return list(csv.DictReader(f, delimiter="\t"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", type=float, nargs="+", default=[0.005, 0.02], help="fractions of the recipe")
    ap.add_argument("--sigma", type=float, default=0.8, help="lognormal sigma of the lengths within a split")
    ap.add_argument("--ranks", type=int, default=1, help="also a local N-rank training run (N > 1)")
    ap.add_argument("--keep", type=Path, default=None, help="work here and keep it (default: a temp dir, removed)")
    ap.add_argument("--json", type=Path, default=None, help="write the raw results here")
    ap.add_argument("--report", type=Path, default=None, help="only print the tables of results saved with --json")
    opts = ap.parse_args()
    if opts.report:
        print(report(json.loads(opts.report.read_text()), opts.ranks))
        return
    work = opts.keep or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = [measure(s, work, opts.sigma, opts.ranks) for s in sorted(opts.scales)]
    finally:
        if opts.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=1))
    print(report(results, opts.ranks))


if __name__ == "__main__":
    main()
