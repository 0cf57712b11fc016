"""Weights with explicit units -> which rows of each source are trained on, and which are held out.

Everything here works on row indices (numpy), never on the rows themselves, so the tokenised data of a source is
computed once (and cached) whatever the weights are. Every random draw is seeded from (mixture.seed, source name),
so the mixture is bit-for-bit the same whatever order the sources are listed in.

- Held-out rows are drawn from each source first, with their own seed, so a sweep over weights evaluates every run
  on the same rows, and a source at weight 0 still has an eval set.
- weighting=fraction (the alignment-handbook meaning, extended): weight w keeps floor(w x rows) of the remaining
  rows after a seeded shuffle; w > 1 takes floor(w) whole copies plus a seeded remainder; w = 0 drops the source.
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


@dataclass(frozen=True)
class SourceSelection:
    train: np.ndarray  # row indices trained on, in a seeded order (repeats when weight > 1)
    eval: np.ndarray  # held-out row indices
    epochs: float  # how many times the source's train rows are seen per epoch of the mixture (= weight)


def select_rows(n_rows: int, weight: float, test_split_size: float, seed: int, name: str) -> SourceSelection:
    """Split one source into held-out rows and weighted train rows (fraction weighting)."""
    perm = source_rng(seed, name, "heldout").permutation(n_rows)
    k = held_out_count(n_rows, test_split_size)
    eval_idx, pool = np.sort(perm[:k]), np.sort(perm[k:])
    whole = int(np.floor(weight))
    remainder = int(np.floor((weight - whole) * len(pool)))
    rng = source_rng(seed, name, "weight")
    parts = [rng.permutation(pool) for _ in range(whole)]
    parts.append(rng.permutation(pool)[:remainder])
    train_idx = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    return SourceSelection(train=train_idx.astype(np.int64), eval=eval_idx.astype(np.int64), epochs=float(weight))
