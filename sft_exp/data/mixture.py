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
- mixture.draw=i (sweep=mixture_random): the weights are replaced by point i of a seeded Dirichlet over the sources,
  within optional per-source min/max shares (or by mixture.search.points[i] when points are given: a proposal).
- mixture.resample_each_epoch: epoch e of a source is the e-th window of k rows of the same endless stream, so a
  fraction source sees fresh rows every epoch and an upsampled one spreads its copies; a pure function of
  (seed, source, epoch).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from sft_exp.errors import ConfigError


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


def take(pool: np.ndarray, k: int, seed: int, name: str, start: int = 0) -> np.ndarray:
    """Rows [start, start + k) of an endless stream of independent seeded shuffles of pool (start=0: the first k)."""
    if k <= 0 or len(pool) == 0:
        return np.empty(0, dtype=np.int64)
    n = len(pool)
    first, last = start // n, (start + k - 1) // n
    rng = source_rng(seed, name, "weight")
    copies = [rng.permutation(pool) for _ in range(last + 1)][first:]
    return np.concatenate(copies)[start - first * n : start - first * n + k].astype(np.int64)


def take_epoch(pool: np.ndarray, k: int, seed: int, name: str, epoch: int) -> np.ndarray:
    """mixture.resample_each_epoch: epoch `epoch` (0-based) of a source that takes k rows per epoch is the window
    [epoch x k, (epoch + 1) x k) of its stream. A fraction source (k < pool) sees new rows each epoch until the pool
    is used up; an upsampled one (k > pool) spreads its copies over the epochs. Epoch 0 is what `take` gives."""
    return take(pool, k, seed, name, start=epoch * k)


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
        stream = take(pool, len(pool), seed, name, start=k)
        k += int(np.searchsorted(np.cumsum(trained[stream]), rest) + 1)
    return k


@dataclass(frozen=True)
class SourceSelection:
    train: np.ndarray  # row indices trained on, in a seeded order (repeats when a source is upsampled)
    eval: np.ndarray  # held-out row indices
    epochs: float  # passes over the source's pool per epoch of the mixture (rows taken / pool size)
    pool: np.ndarray | None = None  # the trainable rows (the stream's pool), for epoch_rows

    def epoch_rows(self, seed: int, name: str, epoch: int) -> np.ndarray:
        """mixture.resample_each_epoch: this source's rows of epoch `epoch` (0-based; epoch 0 is `train`), a pure
        function of (seed, name, epoch) -- see take_epoch."""
        if epoch == 0 or self.pool is None:
            return self.train
        return take_epoch(self.pool, len(self.train), seed, name, epoch)


def epoch_report(selections: dict[str, SourceSelection], seed: int, epochs: int) -> dict[str, dict[str, list[int]]]:
    """Per source, for epochs 0..epochs-1 under resample_each_epoch: rows trained and rows not trained in an earlier
    epoch (`new_rows`), as written to mixture_stats.json (mixture.rows_per_epoch)."""
    out = {}
    for name, sel in selections.items():
        seen: set[int] = set()
        rows, new = [], []
        for e in range(epochs):
            r = sel.epoch_rows(seed, name, e)
            rows.append(len(r))
            new.append(len(set(r.tolist()) - seen))
            seen.update(r.tolist())
        out[name] = {"rows": rows, "new_rows": new}
    return out


def select_fraction(n_rows: int, weight: float, test_split_size: float, seed: int, name: str) -> SourceSelection:
    """weighting=fraction: keep floor(weight x pool) rows."""
    eval_idx, pool = split_heldout(n_rows, test_split_size, seed, name)
    k = int(np.floor(weight * len(pool)))
    return SourceSelection(take(pool, k, seed, name), eval_idx, k / max(1, len(pool)), pool)


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
        out[name] = SourceSelection(take(pool, k, seed, name), eval_idx, k / max(1, len(pool)), pool)
    return out


# ------------------------------------------------------------------------------------------- random mixtures
def draw_shares(
    names: list[str],
    index: int,
    seed: int = 0,
    alpha: float = 1.0,
    min_share: dict[str, float] | None = None,
    max_share: dict[str, float] | None = None,
    max_tries: int = 100_000,
) -> dict[str, float]:
    """Mixture `index` of a seeded Dirichlet(alpha) over `names`, within per-source [min, max] shares.

    A pure function of (sorted names, index, seed, alpha, bounds). The minimums are given first and the rest is
    Dirichlet-distributed over the sources (x = min + (1 - sum(min)) * Dir(alpha)); draws above a maximum are
    rejected and redrawn from the same generator.

    Raises:
        ConfigError: a bound names an unknown source, the minimums add up to more than 1, the maximums to less than
            1, or no draw within `max_tries` fits the bounds.
    """
    names = sorted(names)
    lo, hi = dict(min_share or {}), dict(max_share or {})
    unknown = sorted((set(lo) | set(hi)) - set(names))
    if unknown:
        raise ConfigError(
            f"mixture.search.min_share/max_share name {unknown}, not sources of the mixture ({', '.join(names)})"
        )
    m = np.array([float(lo.get(n, 0.0)) for n in names])
    x_max = np.array([float(hi.get(n, 1.0)) for n in names])
    if m.sum() > 1 + 1e-9 or x_max.sum() < 1 - 1e-9 or (m > x_max).any():
        raise ConfigError(
            f"mixture.search bounds cannot hold: the minimum shares add up to {m.sum():.3g} (must be <= 1), the "
            f"maximum shares to {x_max.sum():.3g} (must be >= 1), and each minimum must be <= its maximum"
        )
    digest = hashlib.sha256(f"{seed}/draw/{index}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    free = 1.0 - m.sum()
    for _ in range(max_tries):
        x = m + free * rng.dirichlet(np.full(len(names), float(alpha)))
        if (x <= x_max + 1e-12).all():
            return {n: float(v) for n, v in zip(names, x)}
    raise ConfigError(f"mixture.search: no Dirichlet draw in {max_tries} fits the maximum shares {hi}; widen them")


def apply_mixture_draw(mixture: Any) -> None:
    """With mixture.draw=i set, replace every source's weight by mixture i (shares that sum to 1): point i of
    mixture.search.points when given (a proposal), else draw_shares(...) with mixture.search's seed, alpha and bounds.
    Called by to_run_config, so the frozen run_config.yaml holds the weights the run trained with.

    Raises:
        ConfigError: draw without weighting=proportion or without a budget, a point index out of range, a point whose
            sources differ from the mixture's.
    """
    if mixture.draw is None:
        return
    names = sorted(mixture.sources)
    weighting = getattr(mixture.weighting, "value", mixture.weighting)
    if weighting != "proportion" or (mixture.total_tokens is None and mixture.total_rows is None):
        raise ConfigError(
            f"mixture.draw={mixture.draw} needs mixture.weighting=proportion with mixture.total_tokens (or total_rows) "
            f"set, so every run trains on the same budget (got weighting={weighting}); use sweep=mixture_random"
        )
    s = mixture.search
    if s.points:
        if not 0 <= mixture.draw < len(s.points):
            raise ConfigError(f"mixture.draw={mixture.draw}: mixture.search.points has {len(s.points)} points")
        point = dict(s.points[mixture.draw])
        if sorted(point) != names:
            raise ConfigError(
                f"mixture.search.points[{mixture.draw}] names {sorted(point)}, the mixture has {names}: proposals only "
                "run on the mixture they were fitted on"
            )
        total = sum(point.values())
        shares = {n: float(point[n]) / total for n in names}
    else:
        shares = draw_shares(names, mixture.draw, s.seed, s.alpha, s.min_share, s.max_share)
    for n in names:
        mixture.sources[n].weight = shares[n]
