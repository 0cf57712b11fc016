"""Weights with explicit units -> which rows of each source are trained on, and which are held out.

Everything here works on row indices (numpy), never on the rows themselves, so the tokenised data of a source is
computed once (and cached) whatever the weights are. Every random draw is seeded from (mixture.seed, source name),
so the mixture is bit-for-bit the same whatever order the sources are listed in.

- Held-out rows are drawn from each source first, with their own seed, so a sweep over weights evaluates every run
  on the same rows, and a source at weight 0 still has an eval set.
- The rows a source contributes are the first k of an endless stream of independent seeded shuffles of its pool
  (the rows not held out): k <= pool is a seeded subset, k > pool is whole copies plus a seeded remainder.
- weighting=fraction (the alignment-handbook meaning, extended): k = floor(w x pool).
- weighting=proportion: weights are normalised to shares p_i = w_i / sum(w); with mixture.total_rows the source
  gets k = floor(p_i x total_rows) rows, with mixture.total_tokens the shortest prefix of its stream whose trained
  (assistant) tokens reach p_i x total_tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


def source_rng(seed: int, name: str, purpose: str) -> np.random.Generator:
    """A generator that depends only on (seed, source name, purpose), not on the order sources are listed in."""
    digest = hashlib.sha256(f"{seed}/{name}/{purpose}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def held_out_count(n_rows: int, test_split_size: float) -> int:
    """test_split_size < 1 is a fraction of the source, >= 1 a row count; never the whole source."""
    if test_split_size <= 0:
        return 0
    k = int(round(test_split_size * n_rows)) if test_split_size < 1 else int(test_split_size)
    k = max(k, 1)
    if k >= n_rows:
        raise ValueError(f"test_split_size={test_split_size} would hold out all {n_rows} rows of the source")
    return k


def split_heldout(n_rows: int, test_split_size: float, seed: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(held-out row indices, pool of trainable row indices), both sorted."""
    perm = source_rng(seed, name, "heldout").permutation(n_rows)
    k = held_out_count(n_rows, test_split_size)
    return np.sort(perm[:k]).astype(np.int64), np.sort(perm[k:]).astype(np.int64)


def take(pool: np.ndarray, k: int, seed: int, name: str) -> np.ndarray:
    """The first k rows of an endless stream of independent seeded shuffles of pool."""
    if k <= 0 or len(pool) == 0:
        return np.empty(0, dtype=np.int64)
    rng = source_rng(seed, name, "weight")
    copies = -(-k // len(pool))
    return np.concatenate([rng.permutation(pool) for _ in range(copies)])[:k].astype(np.int64)


def rows_for_token_budget(pool: np.ndarray, trained: np.ndarray, budget: float, seed: int, name: str) -> int:
    """Smallest k whose first k streamed rows carry at least `budget` trained tokens (trained: per row of source)."""
    if budget <= 0 or len(pool) == 0:
        return 0
    per_copy = int(trained[pool].sum())
    if per_copy == 0:
        raise ValueError(f"source '{name}' has no trained tokens, it cannot fill a token budget")
    whole = int(budget // per_copy)
    rest = budget - whole * per_copy
    k = whole * len(pool)
    if rest > 0:
        # replay the stream up to the partial copy to find where the remainder is reached
        stream = take(pool, (whole + 1) * len(pool), seed, name)[k:]
        k += int(np.searchsorted(np.cumsum(trained[stream]), rest) + 1)
    return k


@dataclass(frozen=True)
class SourceSelection:
    train: np.ndarray  # row indices trained on, in a seeded order (repeats when a source is upsampled)
    eval: np.ndarray  # held-out row indices
    epochs: float  # passes over the source's pool per epoch of the mixture (rows taken / pool size)


def select_fraction(n_rows: int, weight: float, test_split_size: float, seed: int, name: str) -> SourceSelection:
    """weighting=fraction: keep floor(weight x pool) rows."""
    eval_idx, pool = split_heldout(n_rows, test_split_size, seed, name)
    k = int(np.floor(weight * len(pool)))
    return SourceSelection(take(pool, k, seed, name), eval_idx, k / max(1, len(pool)))


def select_mixture(
    trained_per_row: dict[str, np.ndarray],
    weights: dict[str, float],
    test_split_size: float,
    seed: int,
    weighting: str,
    total_rows: int | None = None,
    total_tokens: int | None = None,
) -> dict[str, SourceSelection]:
    """Every source's selection of training rows (repeats allowed) and held-out rows, drawn per (seed, source name).

    Args:
        trained_per_row: per source, the trained (assistant) tokens of each of its rows.
        weights: per source, mixture.sources.<name>.weight.
        test_split_size: share of each source held out for eval (the same rows whatever the weights).
        seed: mixture.seed.
        weighting: ``fraction`` (keep floor(w x rows); w > 1 repeats) or ``proportion`` (weights are shares of
            ``total_rows`` or ``total_tokens`` of trained tokens).

    Returns:
        {source: SourceSelection(train=row indices, eval=row indices, epochs=selected / available)}.

    Example:
        >>> s = select_mixture({"a": np.array([3, 4, 5, 6]), "b": np.array([1, 1])}, {"a": 0.5, "b": 2.0}, 0.0, 0,
        ...                    "fraction")
        >>> s["a"].train.tolist(), s["b"].train.tolist(), s["b"].epochs
        ([3, 2], [0, 1, 0, 1], 2.0)
    """
    if weighting == "fraction":
        return {n: select_fraction(len(t), weights[n], test_split_size, seed, n) for n, t in trained_per_row.items()}
    total_w = sum(weights.values())
    out = {}
    for name, trained in trained_per_row.items():
        eval_idx, pool = split_heldout(len(trained), test_split_size, seed, name)
        share = weights[name] / total_w
        if total_rows is not None:
            k = int(np.floor(share * total_rows))
        else:
            k = rows_for_token_budget(pool, trained, share * float(total_tokens or 0), seed, name)
        out[name] = SourceSelection(take(pool, k, seed, name), eval_idx, k / max(1, len(pool)))
    return out
