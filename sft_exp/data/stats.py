"""What a prepared mixture holds, typed: `MixtureStats` (written to <run dir>/mixture_stats.json, printed as the
mixture table, sent to the tracker), and the per-source truncation report.

`MixtureStats.to_json()` is the mixture_stats.json format; `MixtureStats.from_json()` reads it back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAX_LISTED = 5  # rows named in a warning


@dataclass
class SourceStats:
    """One source of the mixture: what it held, what was selected for training and held out, and its lengths."""

    rows_in_source: int
    rows_dropped: int  # invalid rows dropped (mixture.on_bad_rows=drop)
    rows_heldout: int  # eval rows (mixture.test_split_size)
    rows: int  # training rows selected (after weighting; repeats counted)
    weight: float
    epochs: float  # rows / unique rows available
    tokens: int
    trained_tokens: int  # assistant tokens selected for the loss
    think_share: float  # share of rows rendered in think mode
    mean_length: float
    p50_length: int
    p95_length: int
    max_length: int
    cache: str  # hit | miss
    rows_over_max_length: int = 0
    rows_assistant_cut: int = 0
    rows_assistant_cut_examples: list[int] = field(default_factory=list)
    assistant_tokens_cut: int | None = None  # overflow=truncate only
    rows_untrained_after_cut: int | None = None  # overflow=truncate only
    format: str = "messages"  # the data format the rows were read as (mixture.sources.<name>.format, auto detected)


@dataclass
class MixtureStats:
    """The prepared mixture. `packing` is the packing plan's summary (efficiency, bins, overflow counts, ...)."""

    mixture: dict[str, Any]  # the weighting settings it was drawn with
    sources: dict[str, SourceStats]
    template_check: dict[str, Any] | None
    total: dict[str, Any]  # rows, rows_heldout, tokens, trained_tokens, think_share
    packing: dict[str, Any]
    cache: dict[str, Any]  # dir, hits, misses
    seconds: dict[str, float]

    @property
    def efficiency(self) -> float:
        return float(self.packing["efficiency"])

    def trained_shares(self) -> dict[str, float]:
        """Each source's share of the trained (assistant) tokens."""
        total = sum(s.trained_tokens for s in self.sources.values()) or 1
        return {n: s.trained_tokens / total for n, s in self.sources.items()}

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["sources"] = {n: {k: v for k, v in s.items() if v is not None} for n, s in out["sources"].items()}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MixtureStats:
        names = {f.name for f in dataclasses.fields(SourceStats)}
        sources = {n: SourceStats(**{k: v for k, v in s.items() if k in names}) for n, s in data["sources"].items()}
        return cls(**{**data, "sources": sources})


def length_stats(lengths: np.ndarray) -> dict[str, Any]:
    """mean / p50 / p95 / max of a source's selected sequence lengths."""
    if len(lengths) == 0:
        return {"mean_length": 0.0, "p50_length": 0, "p95_length": 0, "max_length": 0}
    return {
        "mean_length": round(float(lengths.mean()), 1),
        "p50_length": int(np.percentile(lengths, 50)),
        "p95_length": int(np.percentile(lengths, 95)),
        "max_length": int(lengths.max()),
    }


def format_table(stats: MixtureStats) -> str:
    """The per-source table printed before training and by mode=prepare."""
    cols = ["rows_in_source", "rows_heldout", "weight", "rows", "epochs", "tokens", "trained_tokens", "think_share"]
    cols += ["mean_length", "p95_length", "max_length", "rows_over_max_length", "rows_dropped", "format", "cache"]
    head = ["source", *cols]
    body = [[name, *[str(getattr(s, c)) for c in cols]] for name, s in stats.sources.items()]
    t = stats.total
    body.append(["TOTAL", "", str(t["rows_heldout"]), "", str(t["rows"]), ""])
    body[-1] += [str(t["tokens"]), str(t["trained_tokens"]), str(t["think_share"])] + [""] * (len(cols) - 8)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    p = stats.packing
    lines = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)]
    lines.append(
        f"packing: {p['strategy']} max_length={p['max_length']} bins={p['bins']} "
        f"efficiency={p['efficiency']:.4f}  cache: {stats.cache['hits']} hit / {stats.cache['misses']} miss"
    )
    return "\n".join(lines)


def resolved_mixture(stats: dict[str, Any]) -> dict[str, Any]:
    """mixture.share.<source> (share of trained tokens), rows and epochs per source, packing efficiency (flat keys
    for a tracker's config). `stats`: mixture_stats.json's content (MixtureStats.to_json())."""
    sources = stats.get("sources", {})
    trained = sum(s.get("trained_tokens", 0) for s in sources.values()) or 1
    out: dict[str, Any] = {}
    for name, s in sources.items():
        out[f"mixture.share.{name}"] = round(s.get("trained_tokens", 0) / trained, 6)
        out[f"mixture.rows.{name}"] = s.get("rows")
        out[f"mixture.epochs.{name}"] = s.get("epochs")
    if "packing" in stats:
        out["packing.efficiency"] = stats["packing"].get("efficiency")
        out["packing.rows"] = stats["packing"].get("bins")
    return out


MIXTURE_COLUMNS = ["source", "weight", "share", "rows", "epochs", "tokens", "trained_tokens", "think_share"]
MIXTURE_COLUMNS += ["mean_length", "p95_length", "max_length", "rows_heldout"]


def mixture_rows(stats: dict[str, Any]) -> list[list[Any]]:
    """The mixture table's rows (MIXTURE_COLUMNS) from mixture_stats.json's content."""
    shares = resolved_mixture(stats)
    rows = []
    for name, s in stats.get("sources", {}).items():
        row = {**s, "source": name, "share": shares.get(f"mixture.share.{name}")}
        rows.append([row.get(c) for c in MIXTURE_COLUMNS])
    return rows


def _masks_of_ranges(src: Any, rows: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The assistant masks of tokens [starts[i], starts[i] + lengths[i]) of row rows[i], laid end to end: gathered
    from the memory-mapped cache when the source can (pipeline.TokenizedSource.gather; masks only, no ids), else
    sliced from a flat `assistant_masks` + `offsets` (a source held in memory, as in tests)."""
    dst = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if hasattr(src, "gather"):
        masks = np.empty(int(dst[-1]), dtype=np.int8)
        src.gather(rows, starts, lengths, (None, masks), dst[:-1])
        return masks
    offsets = np.asarray(src.offsets)
    parts = [src.assistant_masks[offsets[r] + a : offsets[r] + a + n] for r, a, n in zip(rows, starts, lengths)]
    return np.concatenate(parts).astype(np.int8) if parts else np.zeros(0, np.int8)


def truncation_report(
    max_length: int, overflow: str, src: Any, rows: np.ndarray, batch_tokens: int = 1 << 24
) -> dict[str, Any]:
    """The rows of a tokenised source (`rows`: its selected row indices) whose assistant tokens reach past
    packing.max_length.

    overflow=truncate drops those tokens (`assistant_tokens_cut`; a row whose first max_length tokens hold no trained
    token trains nothing: `rows_untrained_after_cut`); overflow=split keeps them in a later piece, trained without the
    context before the cut; overflow=drop drops the whole row (counted by the packing stats).

    Works from the per-row lengths (and `first_trained` where the source has it) and reads only the masks of the
    tokens past max_length of the rows over it, about `batch_tokens` bytes at a time: memory stays bounded whatever
    the source's size."""
    lengths_all = np.asarray(src.lengths)
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    over = rows[lengths_all[rows] > max_length]
    first = getattr(src, "first_trained", None)
    tail = lengths_all[over] - max_length  # tokens past the cut, per long row
    beyond = np.zeros(len(over), np.int64)
    kept_any = np.zeros(len(over), bool)
    ends = np.cumsum(tail)
    a = 0
    while a < len(over):
        done = int(ends[a - 1]) if a else 0
        b = max(a + 1, int(np.searchsorted(ends, done + batch_tokens, side="right")))
        r = over[a:b]
        m = _masks_of_ranges(src, r, np.full(len(r), max_length, np.int64), tail[a:b])
        beyond[a:b] = np.add.reduceat(m.astype(np.int64), np.concatenate([[0], np.cumsum(tail[a:b])[:-1]]))
        if first is not None:
            kept_any[a:b] = np.asarray(first)[r] < max_length
        else:
            head = _masks_of_ranges(src, r, np.zeros(len(r), np.int64), np.full(len(r), max_length, np.int64))
            kept_any[a:b] = head.reshape(len(r), max_length).any(axis=1)
        a = b
    cut = over[beyond > 0]
    out: dict[str, Any] = {"rows_assistant_cut": len(cut), "rows_assistant_cut_examples": cut[:MAX_LISTED].tolist()}
    if overflow == "truncate":
        out["assistant_tokens_cut"] = int(beyond.sum())
        out["rows_untrained_after_cut"] = int(((beyond > 0) & ~kept_any).sum())
    return out


def truncation_lines(per_source: dict[str, SourceStats], max_length: int, overflow: str) -> list[str]:
    """Warnings naming the rows whose assistant turn packing.max_length cuts."""
    lines = []
    for name, s in per_source.items():
        n = s.rows_assistant_cut
        if not n or overflow == "drop":
            continue
        rows = ", ".join(map(str, s.rows_assistant_cut_examples)) + (", ..." if n > MAX_LISTED else "")
        if overflow == "truncate":
            what = f"{s.assistant_tokens_cut} trained tokens dropped"
            if s.rows_untrained_after_cut:
                what += f"; {s.rows_untrained_after_cut} of these rows keep no trained token at all"
        else:
            what = "the rest is trained in a later piece, without the context before the cut"
        lines.append(
            f"warning: {name}: packing.max_length={max_length} cuts an assistant turn in {n} rows (rows {rows}); "
            f"overflow={overflow}: {what}. Raise packing.max_length to keep them whole"
        )
    return lines
