"""The data flow of a run: sources -> tokenised + masked (cached per source) -> mixture selection -> packed rows.

    prepare_data(run, tokenizer, run_dir) -> PreparedData (train rows, per-source eval rows, stats)

The per-source cache key holds only what changes a source's tokens (its content fingerprint, the tokenizer, the
template text and its default kwargs, the bad-row policy); weights, mixture seed, max_length and every trainer field
stay out of it, so the runs of a sweep tokenise each source once. Entries are written to a temporary folder and
renamed into place under a file lock, so concurrent runs never see a half-written entry.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sft_exp.config import RunConfig
from sft_exp.data import packing as pk
from sft_exp.data.mixture import select_mixture
from sft_exp.data.sources import check_same_columns, fingerprint, load_source, row_problem
from sft_exp.data.template import RenderSpec, encode_conversations, row_kwargs
from sft_exp.data.template_check import check_template, truncation_lines, truncation_report
from sft_exp.errors import DataError

CACHE_VERSION = "2"


@dataclass
class TokenizedSource:
    """A source's valid rows, tokenised, as stored in the cache: the token data stays in the memory-mapped Arrow
    chunks (nothing is copied until rows are gathered into packed rows); per-row facts are small arrays."""

    name: str
    chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per Arrow chunk: (input_ids, assistant_masks, offsets)
    chunk_rows: np.ndarray  # int64, len = chunks + 1: row r lives in chunk c where chunk_rows[c] <= r < [c + 1]
    lengths: np.ndarray  # int64 tokens per row
    trained: np.ndarray  # int64 assistant (trained) tokens per row
    first_trained: np.ndarray  # int64 position of the first trained token (= length when none)
    think: np.ndarray  # int8 per row: 1 if the row renders in /think mode
    rows_in_source: int
    rows_dropped: int
    cache: str  # "hit" or "miss"
    columns: list[str] = field(default_factory=list)  # the source's columns as loaded (after `columns` selection)

    def _flat(self, k: int) -> np.ndarray:
        return np.concatenate([c[k] for c in self.chunks]) if self.chunks else np.empty(0, np.int32)

    # Flat views for diagnostics (template check, truncation report): these copy the source's tokens into memory.
    @functools.cached_property
    def input_ids(self) -> np.ndarray:
        return self._flat(0)

    @functools.cached_property
    def assistant_masks(self) -> np.ndarray:
        return self._flat(1)

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        return np.concatenate(([0], np.cumsum(self.lengths))).astype(np.int64)

    def gather(self, rows: np.ndarray, starts: np.ndarray, lengths: np.ndarray, outs: tuple, dst: np.ndarray) -> None:
        """Copy tokens [starts[p], starts[p] + lengths[p]) of row rows[p] to dst[p] in each of outs (ids, masks),
        chunk by chunk, straight from the memory-mapped cache."""
        chunk = np.searchsorted(self.chunk_rows, rows, side="right") - 1
        order = np.argsort(chunk, kind="stable")
        bounds = np.searchsorted(chunk[order], np.arange(len(self.chunks) + 1))
        for c in range(len(self.chunks)):
            sel = order[bounds[c] : bounds[c + 1]]
            if len(sel) == 0:
                continue
            ids, masks, offs = self.chunks[c]
            src_start = offs[rows[sel] - self.chunk_rows[c]] + starts[sel]
            for column, out in zip((ids, masks), outs):
                pk.scatter(column, src_start, lengths[sel], out, dst[sel])


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset of packed rows
    eval: dict[str, Any]  # source name -> datasets.Dataset of packed held-out rows
    eval_trained_tokens: dict[str, int]
    source_names: list[str]
    stats: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------- tokenising
def _tokenizer_digest(tokenizer: Any) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def cache_key(name: str, run: RunConfig, spec: RenderSpec, tokenizer_digest: str) -> str:
    parts = {
        "v": CACHE_VERSION,
        "source": fingerprint(run.mixture.sources[name]),
        "tokenizer": tokenizer_digest,
        "template": hashlib.sha256(spec.chat_template.encode()).hexdigest()[:16],
        "enable_thinking": spec.enable_thinking,
        "date_string": spec.date_string,
        "special_tokens": spec.special_tokens,
        "train_on": spec.train_on,
        "on_bad_rows": run.mixture.on_bad_rows.value,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _think_mode(spec: RenderSpec, messages: list[dict[str, Any]], kwargs: Any) -> int:
    """The reasoning mode a row renders in: a system flag overrides the row's kwargs, which override the default."""
    system = next((m.get("content") or "" for m in messages if m.get("role") == "system"), "")
    if "/no_think" in system:
        return 0
    if "/think" in system:
        return 1
    return int(bool(row_kwargs(spec, kwargs).get("enable_thinking", True)))


def _tokenize_fn(spec: RenderSpec, tokenizer: Any, name: str, drop_bad: bool):
    """The `Dataset.map` function: a batch of conversations -> an Arrow table built straight from the flat token and
    mask arrays (zero-copy list columns; no per-row Python lists for datasets to convert) with per-row facts."""
    import pyarrow as pa

    def fn(batch: dict[str, list[Any]], idx: list[int]) -> pa.Table:
        kwargs = batch.get("chat_template_kwargs")
        keep_msgs, keep_kw, keep_idx = [], [], []
        for j, (i, msgs) in enumerate(zip(idx, batch["messages"])):
            problem = row_problem(msgs)
            if problem is not None:
                if drop_bad:
                    continue
                raise DataError(
                    f"mixture.sources.{name}: row {i} is not a valid conversation: {problem}. "
                    "Fix the data, or set mixture.on_bad_rows=drop to drop (and count) such rows"
                )
            keep_msgs.append(msgs)
            keep_kw.append(kwargs[j] if kwargs is not None else None)
            keep_idx.append(i)
        enc = encode_conversations(spec, tokenizer, keep_msgs, keep_kw)
        ids = np.ascontiguousarray(enc.ids, dtype=np.int32)
        masks = np.ascontiguousarray(enc.masks, dtype=np.int8)
        offsets = np.asarray(enc.row_offsets, dtype=np.int64)
        starts, ends = offsets[:-1], offsets[1:]
        lengths = ends - starts
        # Per-row facts stored beside the tokens, so selection, stats and checks never scan the token data.
        trained = np.add.reduceat(masks.astype(np.int64), starts) if len(ids) else np.zeros(len(starts), np.int64)
        trained[lengths == 0] = 0  # reduceat gives the element at an empty row's start
        has = trained > 0  # then the first marked token at or after the row's start lies inside the row
        ones = np.flatnonzero(masks)
        first = lengths.copy()
        first[has] = ones[np.searchsorted(ones, starts[has])] - starts[has]
        think = np.fromiter((_think_mode(spec, m, k) for m, k in zip(keep_msgs, keep_kw)), np.int64, len(keep_msgs))

        def list_col(values: np.ndarray, value_type: pa.DataType) -> pa.Array:
            return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=value_type))

        return pa.table(
            {
                "row": pa.array(np.asarray(keep_idx, dtype=np.int64)),
                "input_ids": list_col(ids, pa.int32()),
                "assistant_masks": list_col(masks, pa.int8()),
                "think": pa.array(think),
                "length": pa.array(lengths.astype(np.int64)),
                "trained": pa.array(trained.astype(np.int64)),
                "first_trained": pa.array(first.astype(np.int64)),
            }
        )

    return fn


def _from_cached(name: str, path: Path, cache: str) -> TokenizedSource:
    import datasets

    ds = datasets.load_from_disk(str(path))  # memory-mapped
    meta = json.loads((path / "sft_exp_meta.json").read_text())
    table = ds.data.table
    ids_col, mask_col = table.column("input_ids"), table.column("assistant_masks")
    chunks, rows = [], [0]
    for ids, masks in zip(ids_col.chunks, mask_col.chunks):
        # .values is the chunk's whole (unsliced) buffer: cut it to the chunk's own range; zero-copy views.
        offs = ids.offsets.to_numpy().astype(np.int64)
        moffs = masks.offsets.to_numpy()
        chunks.append(
            (
                ids.values.to_numpy()[offs[0] : offs[-1]],
                masks.values.to_numpy()[moffs[0] : moffs[-1]],
                offs - offs[0],
            )
        )
        rows.append(rows[-1] + len(ids))

    def col(name: str, dtype: Any) -> np.ndarray:
        return table.column(name).to_numpy().astype(dtype)

    return TokenizedSource(
        name,
        chunks,
        np.asarray(rows, dtype=np.int64),
        col("length", np.int64),
        col("trained", np.int64),
        col("first_trained", np.int64),
        col("think", np.int8),
        meta["rows_in_source"],
        meta["rows_dropped"],
        cache,
        meta["columns"],
    )


def tokenize_source(name: str, run: RunConfig, spec: RenderSpec, tokenizer: Any, cache_dir: Path) -> TokenizedSource:
    """Tokenise one source through the cache: a hit memory-maps the stored Arrow data, a miss builds and stores it."""
    from filelock import FileLock

    key = cache_key(name, run, spec, _tokenizer_digest(tokenizer))
    final = cache_dir / f"{name}-{key}"
    if (final / "sft_exp_meta.json").exists():
        return _from_cached(name, final, "hit")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / f"{name}-{key}.lock")):
        if (final / "sft_exp_meta.json").exists():  # another run of the sweep built it while we waited
            return _from_cached(name, final, "hit")
        ds = load_source(name, run.mixture.sources[name])
        rows_in_source = len(ds)
        drop_bad = run.mixture.on_bad_rows.value == "drop"
        out = ds.map(
            _tokenize_fn(spec, tokenizer, name, drop_bad),
            batched=True,
            batch_size=512,
            with_indices=True,
            remove_columns=ds.column_names,
            num_proc=run.mixture.num_proc if run.mixture.num_proc > 1 else None,
            desc=f"tokenise {name}",
            load_from_cache_file=False,
            new_fingerprint=key,
        )
        tmp = cache_dir / f".{name}-{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        out.save_to_disk(str(tmp))
        meta = {
            "rows_in_source": rows_in_source,
            "rows_dropped": rows_in_source - len(out),
            "key": key,
            "columns": sorted(ds.column_names),
        }
        (tmp / "sft_exp_meta.json").write_text(json.dumps(meta))
        os.replace(tmp, final)  # atomic: readers see no entry or a whole one
    return _from_cached(name, final, "miss")


def check_header_fits(run: RunConfig, sources: list[TokenizedSource]) -> None:
    """Refuse a max_length that truncation would leave without a single trained token in every row of a source
    (the template's header + first user turn alone reach max_length)."""
    _, overflow = packing_choice(run)
    if overflow == "split" or not run.train.assistant_only_loss:
        return
    limit = run.packing.max_length
    for src in sources:
        first = src.first_trained
        if len(first) and first.min() >= limit:
            raise DataError(
                f"packing.max_length={limit} is too small for the template's header: in every row of source "
                f"'{src.name}' the first assistant token comes at position >= {first.min()}, so truncation would "
                f"leave nothing to train. Use packing.max_length >= {int(np.percentile(first, 95)) + 64}"
            )


# ------------------------------------------------------------------------------------------------------- packing
def packing_choice(run: RunConfig) -> tuple[str, str]:
    """(planner strategy, overflow policy): TRL's bfd_split is our bfd with long sequences split."""
    strategy = run.packing.strategy.value if run.packing.enabled else "none"
    if strategy == "bfd_split":
        return "bfd", "split"
    return strategy, run.packing.overflow.value


def _pack(
    run: RunConfig, sources: list[TokenizedSource], selections: list[np.ndarray]
) -> tuple[Any, dict[str, Any], np.ndarray, pk.PackPlan]:
    """Pack the selected rows of every source together into a datasets.Dataset of packed rows."""
    import datasets
    import pyarrow as pa

    # The plan is made over the selected rows of every source (with repeats for weights > 1).
    lengths = [src.lengths[sel] for src, sel in zip(sources, selections)]
    src_of_seq = [np.full(len(sel), s_i, dtype=np.int16) for s_i, sel in enumerate(selections)]
    lengths_a = np.concatenate(lengths).astype(np.int64)
    seq_src = np.concatenate(src_of_seq)
    strategy, overflow = packing_choice(run)
    plan = pk.pack_plan(lengths_a, run.packing.max_length, strategy, overflow)
    piece_src = seq_src[plan.seq_index]
    # One output allocation per column; rows are copied chunk by chunk from each source's memory-mapped cache.
    out_ids, out_masks = np.empty(plan.tokens, np.int32), np.empty(plan.tokens, np.int8)
    token_offsets = np.concatenate(([0], np.cumsum(plan.length))).astype(np.int64)  # where each piece starts
    local_rows = np.concatenate(selections)[plan.seq_index] if len(plan.seq_index) else plan.seq_index
    for s_i, src in enumerate(sources):
        p = np.flatnonzero(piece_src == s_i)
        src.gather(local_rows[p], plan.start[p], plan.length[p], (out_ids, out_masks), token_offsets[p])
    row_offsets = token_offsets[plan.row_offsets]

    def list_col(values: np.ndarray, offsets: np.ndarray) -> pa.Array:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))

    table = pa.table(
        {
            "input_ids": list_col(out_ids, row_offsets),
            "loss_mask": list_col(out_masks, row_offsets),
            "seq_lengths": list_col(plan.length.astype(np.int32), plan.row_offsets),
            "seq_sources": list_col(piece_src.astype(np.int16), plan.row_offsets),
        }
    )
    return datasets.Dataset(table), plan.summary(), lengths_a, plan


# ------------------------------------------------------------------------------------------------------- the stage
def _length_stats(lengths: np.ndarray) -> dict[str, float]:
    if len(lengths) == 0:
        return {"mean_length": 0.0, "p50_length": 0, "p95_length": 0, "max_length": 0}
    return {
        "mean_length": round(float(lengths.mean()), 1),
        "p50_length": int(np.percentile(lengths, 50)),
        "p95_length": int(np.percentile(lengths, 95)),
        "max_length": int(lengths.max()),
    }


def prepare_data(run: RunConfig, tokenizer: Any, cache_dir: Path, *, verbose: bool = True) -> PreparedData:
    """Build the mixture, tokenise (through the cache), select rows by weight, pack train and per-source eval sets.

    `verbose`: print the template check (rank 0). The ranks of a multi-process run pass False: the launcher already
    prepared the data and printed it once."""
    t0 = time.perf_counter()
    spec = RenderSpec.build(run.template, tokenizer)
    names = sorted(run.mixture.sources)  # sorted: the result does not depend on the listing order
    # Prove the loss mask on samples of every source before tokenising anything (raises, naming source and row).
    from sft_exp.ranks import is_main_process

    template_check = check_template(run, spec, tokenizer) if run.train.assistant_only_loss else None
    if template_check is not None and verbose and is_main_process():
        print(template_check.format(), flush=True)
    sources = [tokenize_source(n, run, spec, tokenizer, cache_dir) for n in names]
    t_tok = time.perf_counter() - t0

    for src in sources:
        if len(src.lengths) == 0:
            raise DataError(f"mixture.sources.{src.name}: no valid rows left ({src.rows_dropped} dropped)")
    check_same_columns({s.name: s.columns for s in sources})
    check_header_fits(run, sources)
    m = run.mixture
    trained_rows = {s.name: s.trained for s in sources}
    weights = {n: m.sources[n].weight for n in names}
    selections = select_mixture(
        trained_rows, weights, m.test_split_size, m.seed, m.weighting.value, m.total_rows, m.total_tokens
    )
    train_sel = [selections[s.name].train for s in sources]
    eval_sel = [selections[s.name].eval for s in sources]
    per_source = {}
    for src in sources:
        sel = selections[src.name]
        tl = src.lengths[sel.train]
        per_source[src.name] = {
            "rows_in_source": src.rows_in_source,
            "rows_dropped": src.rows_dropped,
            "rows_heldout": int(len(sel.eval)),
            "rows": int(len(sel.train)),
            "weight": weights[src.name],
            "epochs": round(sel.epochs, 4),
            "tokens": int(tl.sum()),
            "trained_tokens": int(trained_rows[src.name][sel.train].sum()),
            "think_share": round(float(src.think[sel.train].mean()), 4) if len(sel.train) else 0.0,
            **_length_stats(tl),
            "cache": src.cache,
        }

    train_ds, pstats, lengths, plan = _pack(run, sources, train_sel)
    # overflow is counted per sequence; attribute truncations back to their sources
    over = lengths > run.packing.max_length
    seq_src = np.concatenate([np.full(len(s), i) for i, s in enumerate(train_sel)])
    overflow = packing_choice(run)[1]
    for i, src in enumerate(sources):
        per_source[src.name]["rows_over_max_length"] = int(over[seq_src == i].sum())
        per_source[src.name].update(truncation_report(run.packing.max_length, overflow, src, train_sel[i]))
    for line in truncation_lines(per_source, run.packing.max_length, overflow) if is_main_process() else []:
        print(line, flush=True)

    eval_sets, eval_trained = {}, {}
    for src, sel in zip(sources, eval_sel):
        if len(sel) == 0:
            continue
        blanks = [np.empty(0, dtype=np.int64)] * len(sources)
        only = [sel if s is src else blanks[0] for s in sources]
        ds, _, _, _ = _pack(run, sources, only)
        eval_sets[src.name] = ds
        eval_trained[src.name] = int(sum(int(np.sum(m)) for m in ds["loss_mask"]))

    total_tokens = sum(s["tokens"] for s in per_source.values())
    stats = {
        "mixture": {
            "weighting": m.weighting.value,
            "total_rows": m.total_rows,
            "total_tokens": m.total_tokens,
            "seed": m.seed,
            "test_split_size": m.test_split_size,
        },
        "sources": per_source,
        "template_check": template_check.summary() if template_check is not None else None,
        "total": {
            "rows": sum(s["rows"] for s in per_source.values()),
            "rows_heldout": sum(s["rows_heldout"] for s in per_source.values()),
            "tokens": total_tokens,
            "trained_tokens": sum(s["trained_tokens"] for s in per_source.values()),
            "think_share": round(
                sum(s["think_share"] * s["rows"] for s in per_source.values())
                / max(1, sum(s["rows"] for s in per_source.values())),
                4,
            ),
        },
        "packing": {
            "strategy": run.packing.strategy.value if run.packing.enabled else "none",
            "max_length": run.packing.max_length,
            **pstats,
        },
        "cache": {
            "dir": str(cache_dir),
            "hits": sum(s.cache == "hit" for s in sources),
            "misses": sum(s.cache == "miss" for s in sources),
        },
        "seconds": {"tokenise": round(t_tok, 3), "total": round(time.perf_counter() - t0, 3)},
    }
    return PreparedData(train_ds, eval_sets, eval_trained, names, stats)


def format_table(stats: dict[str, Any]) -> str:
    """The per-source table printed before training and by mode=prepare."""
    cols = ["rows_in_source", "rows_heldout", "weight", "rows", "epochs", "tokens", "trained_tokens", "think_share"]
    cols += ["mean_length", "p95_length", "max_length", "rows_over_max_length", "rows_dropped", "cache"]
    head = ["source", *cols]
    body = [[name, *[str(s.get(c, "")) for c in cols]] for name, s in stats["sources"].items()]
    t = stats["total"]
    body.append(["TOTAL", "", str(t["rows_heldout"]), "", str(t["rows"]), ""])
    body[-1] += [str(t["tokens"]), str(t["trained_tokens"]), str(t["think_share"])] + [""] * (len(cols) - 8)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    p = stats["packing"]
    lines = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)]
    lines.append(
        f"packing: {p['strategy']} max_length={p['max_length']} bins={p['bins']} "
        f"efficiency={p['efficiency']:.4f}  cache: {stats['cache']['hits']} hit / {stats['cache']['misses']} miss"
    )
    return "\n".join(lines)
