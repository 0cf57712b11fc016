"""The data flow of a run: sources -> tokenised + masked (cached per source) -> mixture selection -> packed rows.

    prepare_data(run, tokenizer, run_dir) -> PreparedData (train rows, per-source eval rows, stats)

The per-source cache key holds only what changes a source's tokens (its content fingerprint, the tokenizer, the
template text and its default kwargs, the bad-row policy); weights, mixture seed, max_length and every trainer field
stay out of it, so the runs of a sweep tokenise each source once. Entries are written to a temporary folder and
renamed into place under a file lock, so concurrent runs never see a half-written entry.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
from filelock import FileLock

from sft_exp.config import RunConfig, SourceConfig
from sft_exp.data import packing as pk
from sft_exp.data.mixture import select_mixture
from sft_exp.data.sources import fingerprint, load_source, row_problem
from sft_exp.data.stats import MixtureStats, SourceStats, length_stats, truncation_lines, truncation_report
from sft_exp.data.template import RenderSpec, encode_conversations, row_kwargs
from sft_exp.data.template_check import check_template, sample_indices
from sft_exp.errors import DataError
from sft_exp.ranks import is_main_process

CACHE_VERSION = "2"
# Tokens per tokenise batch (about): a worker holds one batch's texts, encodings and arrays, so the batch is bounded
# in tokens, not only in rows, or a source of 15k-token conversations would hold 512 x 15k tokens at once.
MAP_BATCH_TOKENS = 1 << 21


@dataclass
class TokenizedSource:
    """A source's valid rows, tokenised, as stored in the cache: the token data stays in the memory-mapped Arrow
    chunks (nothing is copied until rows are gathered, one packed batch at a time); per-row facts are small arrays.

    Pickling keeps the cache path, not the token data: an unpickled copy (e.g. in a DataLoader worker started with
    spawn) maps the same cache files again."""

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
    path: str = ""  # the cache entry the chunks map
    format: str = "messages"  # the data format its rows were read as (sft_exp.data.formats)

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("chunks", "input_ids", "assistant_masks")}
        return {**state, "chunks": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.chunks is None:
            self.chunks, _ = _open_chunks(Path(self.path))

    def _flat(self, k: int) -> np.ndarray:
        return np.concatenate([c[k] for c in self.chunks]) if self.chunks else np.empty(0, np.int32)

    # Flat copies of the whole source, for tests and diagnostics only: the data stage never uses them.
    @functools.cached_property
    def input_ids(self) -> np.ndarray:
        return self._flat(0)

    @functools.cached_property
    def assistant_masks(self) -> np.ndarray:
        return self._flat(1)

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        return np.concatenate(([0], np.cumsum(self.lengths))).astype(np.int64)

    def gather(
        self,
        rows: np.ndarray,
        starts: np.ndarray,
        lengths: np.ndarray,
        outs: tuple[np.ndarray | None, ...],
        dst: np.ndarray,
    ) -> None:
        """Copy tokens [starts[p], starts[p] + lengths[p]) of row rows[p] to dst[p] in each of outs (ids, masks; an
        out given as None is skipped, so a mask-only gather reads no ids), chunk by chunk, straight from the
        memory-mapped cache. Reads only the pages of the requested ranges."""
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
                if out is not None:
                    pk.scatter(column, src_start, lengths[sel], out, dst[sel])


class PackedRows:
    """The packed rows of a set, gathered on demand: the packing plan (O(pieces) integers) + the sources' memory-mapped
    token data. It is the `datasets` custom-format transform of the set (see `packed_dataset`): given a batch of packed
    row indices it gathers just those rows' tokens, so no more than one batch of tokens is ever in memory.

    Row r is pieces `row_offsets[r]:row_offsets[r + 1]`; piece p is tokens [start[p], start[p] + length[p]) of row
    `seq_row[p]` of source `seq_source[p]`. Pickles small (the plan and the cache paths; see TokenizedSource)."""

    def __init__(
        self,
        sources: list[TokenizedSource],
        row_offsets: np.ndarray,
        seq_source: np.ndarray,
        seq_row: np.ndarray,
        start: np.ndarray,
        length: np.ndarray,
    ) -> None:
        self.sources = sources
        self.row_offsets = np.asarray(row_offsets, dtype=np.int64)
        self.seq_source = np.asarray(seq_source, dtype=np.int16)
        self.seq_row = np.asarray(seq_row, dtype=np.int64)
        self.start = np.asarray(start, dtype=np.int64)
        self.length = np.asarray(length, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def _pieces(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the pieces of `rows` in order, piece offsets per row: len(rows) + 1)."""
        a, b = self.row_offsets[rows], self.row_offsets[rows + 1]
        counts = b - a
        bounds = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        pieces = np.repeat(a - bounds[:-1], counts) + np.arange(bounds[-1], dtype=np.int64)
        return pieces, bounds

    def gather(self, rows: np.ndarray, ids: bool = True) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """Flat (input_ids or None, loss_mask) of packed rows `rows` laid end to end, and the token offset of each
        row (len(rows) + 1)."""
        pieces, bounds = self._pieces(rows)
        lengths = self.length[pieces]
        dst = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
        out_ids = np.empty(int(dst[-1]), np.int32) if ids else None
        out_masks = np.empty(int(dst[-1]), np.int8)
        src_of = self.seq_source[pieces]
        for s_i in np.unique(src_of).tolist():
            p = np.flatnonzero(src_of == s_i)
            sel = pieces[p]
            self.sources[s_i].gather(self.seq_row[sel], self.start[sel], lengths[p], (out_ids, out_masks), dst[p])
        return out_ids, out_masks, dst[bounds]

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """The transform: {"row": [r, ...]} -> the rows' input_ids, loss_mask, seq_lengths, seq_sources (lists, as a
        `datasets` row in python format holds them)."""
        rows = np.asarray(batch["row"], dtype=np.int64)
        ids, masks, offs = self.gather(rows)
        pieces, bounds = self._pieces(rows)
        out: dict[str, list[Any]] = {"input_ids": [], "loss_mask": [], "seq_lengths": [], "seq_sources": []}
        for i in range(len(rows)):
            a, b = int(offs[i]), int(offs[i + 1])
            p = pieces[bounds[i] : bounds[i + 1]]
            out["input_ids"].append(ids[a:b].tolist())  # type: ignore[index]
            out["loss_mask"].append(masks[a:b].tolist())
            out["seq_lengths"].append(self.length[p].tolist())
            out["seq_sources"].append(self.seq_source[p].tolist())
        return out

    def trained_tokens(self, batch_tokens: int = 1 << 24) -> int:
        """Trained (loss_mask = 1) tokens of the whole set, read about `batch_tokens` mask bytes at a time."""
        ends = np.cumsum(np.add.reduceat(self.length, self.row_offsets[:-1])) if len(self) and len(self.length) else []
        total, a = 0, 0
        while a < len(ends):
            done = int(ends[a - 1]) if a else 0
            b = max(a + 1, int(np.searchsorted(ends, done + batch_tokens, side="right")))
            total += int(self.gather(np.arange(a, b, dtype=np.int64), ids=False)[1].sum(dtype=np.int64))
            a = b
        return total


class PackedDataset(datasets.Dataset):
    """A datasets.Dataset whose Arrow table holds only the packed row indices (column `row`, O(rows) memory): every
    access (`ds[i]`, a DataLoader batch through `__getitems__`, iteration) gathers the rows it reads from the
    memory-mapped cache through its custom-format transform (a PackedRows). `ds["input_ids"]` (any of the four
    columns) returns that column as a list, gathering the whole set: for tests and small (eval) sets."""

    COLUMNS = ("input_ids", "loss_mask", "seq_lengths", "seq_sources")

    def set_epoch(self, epoch: int) -> None:
        """mixture.resample_each_epoch: switch to epoch `epoch`'s rows (called by the Trainer's DataLoader at the
        start of every epoch; a no-op otherwise). The length stays epoch 0's: a shorter epoch wraps around, a
        longer one is cut (its plan packs about as many rows, the token budget being the same)."""
        epoch_rows = getattr(self, "epoch_rows", None)
        # The Trainer and accelerate may both pass the same epoch (SourceAwareSFTTrainer._run_epoch): pack it once.
        if epoch_rows is not None and epoch != getattr(self, "resampled_epoch", 0):
            self.set_transform(epoch_rows(epoch))
            self.resampled_epoch = epoch

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str) and key in self.COLUMNS:
            return [x for batch in self.iter(batch_size=256) for x in batch[key]]
        return super().__getitem__(key)


def packed_dataset(rows: PackedRows) -> PackedDataset:
    """The packed rows as a PackedDataset (see there). TRL takes it as any Dataset (its preparation is skipped); the
    Trainer's sampler needs only its length, and its DataLoader reads one batch of rows at a time."""
    ds = PackedDataset(pa.table({"row": pa.array(np.arange(len(rows), dtype=np.int64))}))
    ds.set_transform(rows)
    return ds


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset of packed rows, gathered per access (packed_dataset)
    eval: dict[str, Any]  # source name -> datasets.Dataset of packed held-out rows (the same)
    eval_trained_tokens: dict[str, int]
    source_names: list[str]
    stats: MixtureStats


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


def _open_chunks(path: Path) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]], Any]:
    """Zero-copy numpy views of a cache entry's memory-mapped Arrow chunks, and its table (for the per-row columns)."""
    table = datasets.load_from_disk(str(path)).data.table  # memory-mapped
    chunks = []
    for ids, masks in zip(table.column("input_ids").chunks, table.column("assistant_masks").chunks):
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
    return chunks, table


def _from_cached(name: str, path: Path, cache: str) -> TokenizedSource:
    meta = json.loads((path / "sft_exp_meta.json").read_text())
    chunks, table = _open_chunks(path)
    rows = np.concatenate(([0], np.cumsum([len(c[2]) - 1 for c in chunks]))).astype(np.int64)

    def col(name: str, dtype: Any) -> np.ndarray:
        return table.column(name).to_numpy().astype(dtype)

    return TokenizedSource(
        name,
        chunks,
        rows,
        col("length", np.int64),
        col("trained", np.int64),
        col("first_trained", np.int64),
        col("think", np.int8),
        meta["rows_in_source"],
        meta["rows_dropped"],
        cache,
        meta["columns"],
        str(path),
        meta.get("format", "messages"),
    )


def _map_batch_rows(ds: Any) -> int:
    """Rows per tokenise batch: about MAP_BATCH_TOKENS tokens (estimated from the characters of sampled rows at 3 per
    token), between 8 and 512 rows. The cached tokens do not depend on it."""
    sample = ds.select(sample_indices(len(ds), 64))["messages"]
    chars = sum(len(str(m.get("content") or "")) for row in sample for m in row) / max(1, len(sample))
    return int(np.clip(MAP_BATCH_TOKENS * 3 / max(chars, 1.0), 8, 512))


def tokenize_source(name: str, run: RunConfig, spec: RenderSpec, tokenizer: Any, cache_dir: Path) -> TokenizedSource:
    """Tokenise one source through the cache: a hit memory-maps the stored Arrow data, a miss builds and stores it."""
    key = cache_key(name, run, spec, _tokenizer_digest(tokenizer))
    final = cache_dir / f"{name}-{key}"
    if (final / "sft_exp_meta.json").exists():
        return _from_cached(name, final, "hit")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / f"{name}-{key}.lock")):
        if (final / "sft_exp_meta.json").exists():  # another run of the sweep built it while we waited
            return _from_cached(name, final, "hit")
        ds, fmt = load_source(name, run.mixture.sources[name], with_format=True)
        rows_in_source = len(ds)
        drop_bad = run.mixture.on_bad_rows.value == "drop"
        out = ds.map(
            _tokenize_fn(spec, tokenizer, name, drop_bad),
            batched=True,
            batch_size=_map_batch_rows(ds),
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
            "format": fmt,
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
    """(planner strategy, overflow policy); TRL's bfd_split is packing=bfd_split: strategy bfd + overflow split."""
    return run.packing.strategy.value, run.packing.overflow.value


def _pack(
    run: RunConfig, sources: list[TokenizedSource], selections: list[np.ndarray]
) -> tuple[Any, dict[str, Any], np.ndarray, PackedRows]:
    """Plan the packing of the selected rows of every source together; returns (a datasets.Dataset of the packed rows,
    gathered per access from the memory-mapped cache: see packed_dataset; the plan's summary; the selected lengths;
    the PackedRows). Only O(rows) integers are built here, no token is read."""
    # The plan is made over the selected rows of every source (with repeats for weights > 1).
    lengths_a = np.concatenate([src.lengths[sel] for src, sel in zip(sources, selections)]).astype(np.int64)
    seq_src = np.concatenate([np.full(len(sel), s_i, dtype=np.int16) for s_i, sel in enumerate(selections)])
    strategy, overflow = packing_choice(run)
    plan = pk.pack_plan(lengths_a, run.packing.max_length, strategy, overflow)
    local_rows = np.concatenate(selections).astype(np.int64)[plan.seq_index] if len(plan.seq_index) else plan.seq_index
    rows = PackedRows(sources, plan.row_offsets, seq_src[plan.seq_index], local_rows, plan.start, plan.length)
    return packed_dataset(rows), plan.summary(), lengths_a, rows


def _resample_report(run: RunConfig, selections: dict[str, Any]) -> dict[str, Any]:
    """mixture_stats.json's mixture.rows_per_epoch: per source, rows and new rows of each epoch to be trained."""
    from sft_exp.data.mixture import epoch_report

    epochs = max(1, int(np.ceil(run.train.num_train_epochs)))
    return {"resample_each_epoch": True, "rows_per_epoch": epoch_report(selections, run.mixture.seed, epochs)}


def _epoch_rows(run: RunConfig, sources: list[TokenizedSource], selections: dict[str, Any], n: int, epoch: int) -> Any:
    """The packed rows of epoch `epoch` under mixture.resample_each_epoch, as a transform of n rows (wrapped/cut)."""
    sel = [selections[s.name].epoch_rows(run.mixture.seed, s.name, epoch) for s in sources]
    rows = _pack(run, sources, sel)[3]
    return functools.partial(_remapped, rows, np.arange(n) % max(1, len(rows)))


def _remapped(rows: PackedRows, idx: np.ndarray, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """PackedRows' transform with row r read as row idx[r] (picklable, for DataLoader workers)."""
    return rows({**batch, "row": [int(idx[r]) for r in batch["row"]]})


# ------------------------------------------------------------------------------------------------------- the stage
def source_spec(spec: RenderSpec, source: SourceConfig) -> RenderSpec:
    """The render spec of one source: its own default reasoning mode (mixture.sources.<name>.enable_thinking)."""
    if source.enable_thinking is None:
        return spec
    return dataclasses.replace(spec, enable_thinking=source.enable_thinking)


def default_mode_warnings(
    run: RunConfig, spec: RenderSpec, sources: list[TokenizedSource], trained_tokens: dict[str, int]
) -> list[str]:
    """`warning:` lines for sources whose rows carry no enable_thinking, so the template's default mode (think, and
    the template's system prompt) decides how all of them are rendered, without the user having chosen it.
    `trained_tokens`: each source's selected trained tokens (its share of the mixture is said)."""
    lines = []
    trained = sum(trained_tokens.values()) or 1
    for s in sources:
        cfg = run.mixture.sources[s.name]
        if cfg.enable_thinking is not None or "chat_template_kwargs" in s.columns:
            continue
        mode = "think" if spec.enable_thinking is not False else "no_think"
        lines.append(
            f"warning: {s.name}: its rows carry no chat_template_kwargs.enable_thinking, so all of them "
            f"({trained_tokens.get(s.name, 0) / trained:.1%} of the trained tokens) are rendered in the template's "
            f"default mode ({mode}, with its system prompt). Choose it: mixture.sources.{s.name}.enable_thinking=false"
            " (no_think) or =true (think)"
        )
    return lines


def prepare_data(run: RunConfig, tokenizer: Any, cache_dir: Path, *, verbose: bool = True) -> PreparedData:
    """Build the mixture, tokenise (through the cache), select rows by weight, pack train and per-source eval sets.

    Args:
        run: the run config (mixture, template, packing, train.assistant_only_loss).
        tokenizer: the run's tokenizer (sft_exp.train.model.build_tokenizer), chat template set.
        cache_dir: where tokenised sources are cached, keyed per source by what changes their tokens.
        verbose: print the template check (rank 0). The ranks of a multi-process run pass False: the launcher
            already prepared the data and printed it once.

    Returns:
        PreparedData: `train` (datasets.Dataset of packed rows: input_ids, loss_mask, seq_lengths, seq_sources; the
        rows are gathered from the memory-mapped cache when read, one batch at a time, see packed_dataset),
        `eval` (one packed Dataset per source with held-out rows), `eval_trained_tokens` (the weights of eval "all"),
        `source_names` (sorted) and `stats` (MixtureStats, written as mixture_stats.json).

    Raises:
        DataError / TemplateError naming the source, row and fix, before anything is trained.
    """
    t0 = time.perf_counter()
    spec = RenderSpec.build(run.template, tokenizer)
    names = sorted(run.mixture.sources)  # sorted: the result does not depend on the listing order
    m_sources = run.mixture.sources
    # Prove the loss mask on samples of every source before tokenising anything (raises, naming source and row).

    template_check = check_template(run, spec, tokenizer) if run.train.assistant_only_loss else None
    if template_check is not None and verbose and is_main_process():
        print(template_check.format(), flush=True)
    sources = [tokenize_source(n, run, source_spec(spec, m_sources[n]), tokenizer, cache_dir) for n in names]
    t_tok = time.perf_counter() - t0

    for src in sources:
        if len(src.lengths) == 0:
            raise DataError(f"mixture.sources.{src.name}: no valid rows left ({src.rows_dropped} dropped)")
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
        per_source[src.name] = SourceStats(
            rows_in_source=src.rows_in_source,
            rows_dropped=src.rows_dropped,
            rows_heldout=int(len(sel.eval)),
            rows=int(len(sel.train)),
            weight=weights[src.name],
            epochs=round(sel.epochs, 4),
            tokens=int(tl.sum()),
            trained_tokens=int(trained_rows[src.name][sel.train].sum()),
            think_share=round(float(src.think[sel.train].mean()), 4) if len(sel.train) else 0.0,
            **length_stats(tl),
            cache=src.cache,
            format=src.format,
        )

    train_ds, pstats, lengths, _ = _pack(run, sources, train_sel)
    if m.resample_each_epoch:  # each epoch its own seeded rows (sft_exp/data/mixture.py: take_epoch)
        train_ds.epoch_rows = functools.partial(_epoch_rows, run, sources, selections, len(train_ds))
    trained_by_source = {name: s.trained_tokens for name, s in per_source.items()}
    for line in default_mode_warnings(run, spec, sources, trained_by_source) if verbose and is_main_process() else []:
        print(line, flush=True)
    # overflow is counted per sequence; attribute truncations back to their sources
    over = lengths > run.packing.max_length
    seq_src = np.concatenate([np.full(len(s), i) for i, s in enumerate(train_sel)])
    overflow = packing_choice(run)[1]
    for i, src in enumerate(sources):
        s = per_source[src.name]
        s.rows_over_max_length = int(over[seq_src == i].sum())
        for key, value in truncation_report(run.packing.max_length, overflow, src, train_sel[i]).items():
            setattr(s, key, value)
    for line in truncation_lines(per_source, run.packing.max_length, overflow) if is_main_process() else []:
        print(line, flush=True)

    eval_sets, eval_trained = {}, {}
    for src, sel in zip(sources, eval_sel):
        if len(sel) == 0:
            continue
        blanks = [np.empty(0, dtype=np.int64)] * len(sources)
        only = [sel if s is src else blanks[0] for s in sources]
        ds, _, _, rows = _pack(run, sources, only)
        eval_sets[src.name] = ds
        eval_trained[src.name] = rows.trained_tokens()

    selected = list(per_source.values())
    return PreparedData(
        train_ds,
        eval_sets,
        eval_trained,
        names,
        MixtureStats(
            mixture={
                "weighting": m.weighting.value,
                "total_rows": m.total_rows,
                "total_tokens": m.total_tokens,
                "seed": m.seed,
                "test_split_size": m.test_split_size,
                **(_resample_report(run, selections) if m.resample_each_epoch else {}),
            },
            sources=per_source,
            template_check=template_check.summary() if template_check is not None else None,
            total={
                "rows": sum(s.rows for s in selected),
                "rows_heldout": sum(s.rows_heldout for s in selected),
                "tokens": sum(s.tokens for s in selected),
                "trained_tokens": sum(s.trained_tokens for s in selected),
                "think_share": round(
                    sum(s.think_share * s.rows for s in selected) / max(1, sum(s.rows for s in selected)), 4
                ),
            },
            packing={
                "strategy": run.packing.strategy.value,
                "max_length": run.packing.max_length,
                **pstats,
            },
            cache={
                "dir": str(cache_dir),
                "hits": sum(s.cache == "hit" for s in sources),
                "misses": sum(s.cache == "miss" for s in sources),
            },
            seconds={"tokenise": round(t_tok, 3), "total": round(time.perf_counter() - t0, 3)},
        ),
    )
