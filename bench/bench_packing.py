"""Benchmark global FFD/BFD packing (sft_exp.data.packing) against TRL 1.16's pack_dataset; prints a Markdown table.

Not a test.  Every measurement runs in a fresh subprocess (this script re-invoked with ``--worker``) so peak-RSS
numbers do not contaminate each other; inside the worker the kernel's peak-RSS counter is reset right before the timed
call (``/proc/self/clear_refs``), so "peak RSS delta" is the extra memory of that call alone, not of building inputs.

Inputs
  * smoltalk2-shaped lengths: for each split of the SmolTalk2 SFT stats TSV, ``round(rows * recipe_weight * scale)``
    sequences (the recipe keeps that fraction of each split: 1.44M sequences in all) drawn from a lognormal with the
    split's ``mean_tokens_per_row`` as its mean and ``--sigma`` (1.0), rounded and clipped to [16, 131072], seeded per
    split, then shuffled.  Sequences longer than the capacity exist and are truncated (overflow=truncate).
  * ``--demo FILE``: one length per line (the framework's demo mixture), capacity ``--demo-capacity``.

TRL's pack_dataset holds every sequence as Arrow lists plus Python bookkeeping and is slow (~45 s and 16 GB RSS for 1M
sequences at 4096), so it runs on a uniform ``--trl-rows`` subset, and ours runs on the same subset for a like-for-like
row, as well as on the full set.  TRL inputs use a constant token (only lengths matter for packing).

    python bench/bench_packing.py                  # full run (a few minutes; TRL dominates)
    python bench/bench_packing.py --scale 0.1 --trl-rows 20000   # quick run
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TSV = Path("/work/shared/reference/smoltalk2_sft_split_stats.tsv")
MIN_LEN, MAX_LEN = 16, 131072
TRL_CHUNK = 1000  # datasets.Dataset.map's default batch_size, which bounds TRL's bins


def _import_packing() -> Any:
    try:
        from sft_exp.data import packing
    except ImportError:  # running from a checkout without `pip install -e .`
        sys.path.insert(0, str(REPO))
        from sft_exp.data import packing
    return packing


# --------------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------------


def smoltalk_lengths(tsv: Path, scale: float, sigma: float, seed: int) -> np.ndarray:
    """Synthetic per-sequence lengths shaped like the SmolTalk2 SFT mixture (see module docstring)."""
    parts = []
    with open(tsv, newline="") as f:
        for j, row in enumerate(csv.DictReader(f, delimiter="\t")):
            n = round(int(row["rows"]) * float(row["recipe_weight"]) * scale)
            mu = math.log(float(row["mean_tokens_per_row"])) - sigma**2 / 2  # lognormal mean = exp(mu + sigma^2/2)
            x = np.random.default_rng([seed, j]).lognormal(mu, sigma, n)
            parts.append(np.clip(np.rint(x), MIN_LEN, MAX_LEN).astype(np.int64))
    lengths = np.concatenate(parts)
    return lengths[np.random.default_rng([seed, 1 << 20]).permutation(lengths.shape[0])]


def load_lengths(spec: dict[str, Any]) -> np.ndarray:
    if spec["input"] == "demo":
        lengths = np.loadtxt(spec["demo"], dtype=np.int64, ndmin=1)
    else:
        lengths = smoltalk_lengths(Path(spec["tsv"]), spec["scale"], spec["sigma"], spec["seed"])
    if spec.get("subset"):
        lengths = lengths[: spec["subset"]]  # already shuffled: a uniform sample
    return lengths


# --------------------------------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------------------------------


def _proc_status_mib() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) / 1024
    return out


class PeakRss:
    """Peak RSS of a block above the RSS at its start (Linux: reset the high-water mark via clear_refs)."""

    def __enter__(self) -> PeakRss:
        # Return memory that allocators keep after frees (Arrow's mimalloc pool keeps hundreds of MiB after
        # datasets fingerprints the input table); otherwise the measured call silently reuses it and looks cheap.
        gc.collect()
        if "pyarrow" in sys.modules:
            sys.modules["pyarrow"].default_memory_pool().release_unused()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass  # then the delta may include earlier peaks (reported as an upper bound)
        self.start = _proc_status_mib()["VmRSS"]
        return self

    def __exit__(self, *exc: object) -> None:
        self.delta_mib = _proc_status_mib()["VmHWM"] - self.start


def worker_ours(spec: dict[str, Any]) -> dict[str, Any]:
    packing = _import_packing()
    lengths = load_lengths(spec)
    capacity, strategy = spec["capacity"], spec["strategy"]
    t0 = time.perf_counter()
    packing.compile_kernels()
    res: dict[str, Any] = {"jit_s": time.perf_counter() - t0, "sequences": int(lengths.shape[0])}
    if spec.get("chunk"):  # emulate TRL's map batching with our bfd: bins never shared across chunks
        with PeakRss() as mem:
            t0 = time.perf_counter()
            plans = [
                packing.pack_plan(lengths[a : a + spec["chunk"]], capacity, strategy, "truncate")
                for a in range(0, lengths.shape[0], spec["chunk"])
            ]
            res["plan_s"] = time.perf_counter() - t0
        res["plan_rss_mib"] = mem.delta_mib
        res["bins"] = sum(p.bins for p in plans)
        res["tokens"] = sum(p.tokens for p in plans)
        res["truncated"] = sum(p.overflow_counts["truncated"] for p in plans)
        res["tokens_lost"] = sum(p.overflow_counts["tokens_lost"] for p in plans)
        return res
    ids = offsets = None
    if spec["materialize"]:
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        ids = np.full(int(offsets[-1]), 7, np.int32)  # built before the measured blocks
    with PeakRss() as mem:
        t0 = time.perf_counter()
        plan = packing.pack_plan(lengths, capacity, strategy, spec["overflow"])
        res["plan_s"] = time.perf_counter() - t0
    res["plan_rss_mib"] = mem.delta_mib
    res.update(
        bins=plan.bins,
        tokens=plan.tokens,
        truncated=plan.overflow_counts["truncated"],
        tokens_lost=plan.overflow_counts["tokens_lost"],
        max_row=int(plan.row_lengths.max(initial=0)),
    )
    if strategy in ("ffd", "bfd"):  # the assignment alone, on already-truncated lengths, best of 3
        fn = packing.assign_ffd if strategy == "ffd" else packing.assign_bfd
        clipped = np.minimum(lengths, capacity)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn(clipped, capacity)
            times.append(time.perf_counter() - t0)
        res["assign_s"] = min(times)
    if ids is not None:
        with PeakRss() as mem:
            t0 = time.perf_counter()
            out = packing.materialize(plan, {"input_ids": ids}, offsets)
            res["materialize_s"] = time.perf_counter() - t0
        res["materialize_rss_mib"] = mem.delta_mib
        assert out["input_ids"].shape[0] == plan.tokens and out["row_offsets"][-1] == plan.tokens
    return res


def worker_trl(spec: dict[str, Any]) -> dict[str, Any]:
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets.table import InMemoryTable
    from trl.data_utils import pack_dataset

    datasets.disable_progress_bars()
    lengths = load_lengths(spec)
    capacity = spec["capacity"]
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    wide = offsets[-1] >= 2**31
    values = pa.array(np.full(int(offsets[-1]), 7, np.int32))
    list_type = pa.LargeListArray if wide else pa.ListArray
    column = list_type.from_arrays(pa.array(offsets.astype(np.int64 if wide else np.int32)), values)
    ds = datasets.Dataset(InMemoryTable(pa.table({"input_ids": column})))
    with PeakRss() as mem:
        t0 = time.perf_counter()
        packed = pack_dataset(ds, capacity, spec["strategy"])
        elapsed = time.perf_counter() - t0
    lens = pc.list_value_length(packed.data.column("input_ids")).to_numpy()
    tokens = int(lens.sum())
    long = lengths > capacity
    return {
        "sequences": int(lengths.shape[0]),
        "total_s": elapsed,
        "plan_rss_mib": mem.delta_mib,
        "bins": len(packed),
        "tokens": tokens,
        "truncated": int(long.sum()) if spec["strategy"] == "bfd" else 0,
        "tokens_lost": int(lengths.sum()) - tokens,
        "max_row": int(lens.max(initial=0)),
    }


def worker_compile(spec: dict[str, Any]) -> dict[str, Any]:
    """Cold JIT: NUMBA_CACHE_DIR points at an empty directory (set by the parent), so everything compiles."""
    packing = _import_packing()
    t0 = time.perf_counter()
    packing.compile_kernels()
    cold = time.perf_counter() - t0
    return {"cold_jit_s": cold}


# --------------------------------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------------------------------


def run_worker(spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout)[-2000:]
    return {"error": f"worker exited {proc.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"}


def mem_available_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return format(value, spec)


def table_row(label: str, impl: str, strategy: str, capacity: int, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"| {label} | {impl} | {strategy} | error: {r['error']} |" + " |" * 11
    lb = -(-r["tokens"] // capacity)
    total = r.get("total_s")
    if total is None and "plan_s" in r:
        total = r["plan_s"] + r.get("materialize_s", 0.0) if "materialize_s" in r else None
    cells = [
        label,
        impl,
        strategy,
        fmt(r["sequences"], ","),
        fmt(r["bins"], ","),
        fmt(lb, ","),
        fmt(100 * (r["bins"] / lb - 1) if lb else 0.0, ".3f"),
        fmt(100 * r["tokens"] / (r["bins"] * capacity) if r["bins"] else 100.0, ".3f"),
        f"{r['truncated']:,} / {r['tokens_lost']:,}",
        fmt(r.get("assign_s"), ".3f"),
        fmt(r.get("plan_s"), ".3f"),
        fmt(r.get("materialize_s"), ".3f"),
        fmt(total, ".3f"),
        fmt(r.get("plan_rss_mib"), ",.0f"),
        fmt(r.get("materialize_rss_mib"), ",.0f"),
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| input | impl | strategy | sequences | rows (bins) | lower bound | bins/LB − 1 (%) | efficiency (%) "
    "| truncated seqs / tokens lost | assign s | plan s | materialize s | total s "
    "| peak RSS Δ plan/pack (MiB) | peak RSS Δ materialize (MiB) |\n"
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tsv", type=Path, default=DEFAULT_TSV, help="SmolTalk2 split stats (split, weight, rows, ...)")
    ap.add_argument("--capacity", type=int, default=65536)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of each split's rows (quick runs: 0.05)")
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trl-rows", type=int, default=200_000, help="subset for TRL and like-for-like rows; 0: no TRL")
    ap.add_argument(
        "--materialize-full",
        choices=("auto", "yes", "no"),
        default="auto",
        help="materialize int32 input_ids for the full set (needs ~2x its tokens*4 bytes; auto: if memory allows)",
    )
    ap.add_argument("--demo", type=Path, default=None, help="file with one sequence length per line")
    ap.add_argument("--demo-capacity", type=int, default=None, help="capacity for --demo (default: --capacity)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker is not None:
        spec = json.loads(args.worker)
        fn = {"ours": worker_ours, "trl": worker_trl, "compile": worker_compile}[spec["impl"]]
        print("RESULT " + json.dumps(fn(spec)), flush=True)
        return

    cap = args.capacity
    base = {"input": "smoltalk", "tsv": str(args.tsv), "scale": args.scale, "sigma": args.sigma, "seed": args.seed}
    lengths = load_lengths(base)
    n, tokens = int(lengths.shape[0]), int(lengths.sum())
    n_long = int((lengths > cap).sum())
    print(f"# Packing benchmark (capacity {cap:,})\n")
    print(
        f"smoltalk2-shaped input: {n:,} sequences, {tokens:,} tokens (mean {tokens / n:,.0f}, median "
        f"{int(np.median(lengths)):,}, max {int(lengths.max()):,}); {n_long:,} sequences > {cap:,} "
        f"({int((lengths[lengths > cap] - cap).sum()):,} tokens beyond capacity); lognormal sigma {args.sigma}, "
        f"seed {args.seed}, scale {args.scale}.  Overflow policy: truncate, except wrapped (long sequences are cut).\n"
    )
    subset = min(args.trl_rows, n) if args.trl_rows else 0

    with tempfile.TemporaryDirectory() as cache_dir:
        cold = run_worker({"impl": "compile"}, env={**os.environ, "NUMBA_CACHE_DIR": cache_dir})

    need_mib = tokens * 4 * 2 / 2**20
    if args.materialize_full == "auto":
        materialize_full = mem_available_mib() > 2 * need_mib + 4096  # leave room for whatever else runs here
    else:
        materialize_full = args.materialize_full == "yes"

    rows: list[str] = []
    results: dict[tuple[str, str, str], dict[str, Any]] = {}

    def ours(label: str, spec: dict[str, Any], strategy: str, materialize: bool, chunk: int | None = None) -> None:
        shown = f"{strategy} (chunks of {chunk})" if chunk else strategy
        # wrapped needs no overflow policy (long sequences are cut like any other), as in TRL's wrapped.
        overflow = None if strategy == "wrapped" else "truncate"
        job = {**spec, "impl": "ours", "strategy": strategy, "overflow": overflow, "materialize": materialize}
        r = run_worker({**job, "chunk": chunk})
        results[(label, "ours", shown)] = r
        rows.append(table_row(label, "ours", shown, spec["capacity"], r))
        print(f"  done: {label} ours {shown}", file=sys.stderr, flush=True)

    def trl(label: str, spec: dict[str, Any], strategy: str) -> None:
        r = run_worker({**spec, "impl": "trl", "strategy": strategy})
        results[(label, "trl", strategy)] = r
        rows.append(table_row(label, "TRL 1.16 pack_dataset", strategy, spec["capacity"], r))
        print(f"  done: {label} trl {strategy}", file=sys.stderr, flush=True)

    full = {**base, "capacity": cap, "subset": None}
    full_label = f"smoltalk2 full ({n / 1e6:.2f}M)"
    for strategy in ("ffd", "bfd", "wrapped", "none"):
        ours(full_label, full, strategy, materialize=materialize_full and strategy in ("ffd", "bfd"))
    ours(full_label, full, "bfd", materialize=False, chunk=TRL_CHUNK)
    if subset:
        sub = {**base, "capacity": cap, "subset": subset}
        sub_label = f"smoltalk2 subset ({subset / 1e3:.0f}k)"
        for strategy in ("ffd", "bfd", "wrapped", "none"):
            ours(sub_label, sub, strategy, materialize=strategy != "none")
        ours(sub_label, sub, "bfd", materialize=False, chunk=TRL_CHUNK)
        for strategy in ("bfd", "wrapped"):
            trl(sub_label, sub, strategy)
    if args.demo is not None:
        demo = {"input": "demo", "demo": str(args.demo), "capacity": args.demo_capacity or cap, "subset": None}
        for strategy in ("ffd", "bfd", "wrapped", "none"):
            ours("demo", demo, strategy, materialize=strategy != "none")
        for strategy in ("bfd", "wrapped"):
            trl("demo", demo, strategy)

    print(HEADER)
    print("\n".join(rows))
    warm = [r["jit_s"] for r in results.values() if "jit_s" in r]
    print(
        f"\nJIT: cold compile of all kernels {cold.get('cold_jit_s', float('nan')):.2f} s (empty NUMBA_CACHE_DIR); "
        f"with numba's on-disk cache {min(warm):.2f}-{max(warm):.2f} s per fresh process.  Neither is in the timings."
    )
    print(
        "assign s: assign_ffd/assign_bfd alone on capacity-clipped lengths (best of 3).  plan s: pack_plan (overflow, "
        "sort, assignment, CSR rows; first call).  TRL total s: pack_dataset (assignment and materialisation in one "
        "Dataset.map).  Efficiency: tokens kept / (rows x capacity); for `none` that is the fill of rows padded to "
        "the capacity.  Peak RSS Δ: high-water mark of the call above the RSS before it, fresh process per row."
    )
    if not materialize_full:
        print(f"Full-set materialize skipped (needs ~{need_mib / 1024:.1f} GiB; use --materialize-full yes).")

    r = results.get((full_label, "ours", "ffd"), {})
    if "bins" in r:
        lb = -(-r["tokens"] // cap)
        eff = r["tokens"] / (r["bins"] * cap)
        over = r["bins"] / lb - 1
        checks = [
            (f"efficiency {100 * eff:.4f}% >= 99.9%", eff >= 0.999),
            (f"bins {100 * over:.4f}% over lower bound <= 0.1%", over <= 0.001),
            (f"assign {r['assign_s']:.3f} s < 1 s", r["assign_s"] < 1.0),
        ]
        status = ", ".join(f"{text} {'PASS' if ok else 'FAIL'}" for text, ok in checks)
        print(f"\nTarget (ffd, full set, capacity {cap:,}): {status}")


if __name__ == "__main__":
    main()
