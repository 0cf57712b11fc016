"""Global sequence packing: first-fit-decreasing over the whole training set.

Why this module exists
----------------------
TRL 1.16 packs inside ``Dataset.map(batched=True)`` with the default batch size of 1000 rows, so its best-fit bins are
never shared across chunks: every chunk leaves its own partly filled tail bins, and at a 65536-token capacity a chunk
of 1000 SmolTalk2-sized conversations fills only ~20 bins, so the tail waste is a few percent.  Here packing is planned
once over the lengths of *all* sequences, then the token data is gathered in one pass.

Pipeline (all pure numpy functions on length arrays; no token data is touched until :func:`materialize`)::

    lengths --apply_overflow--> pieces (seq_index, start, length) --assign_ffd/bfd--> bin ids --> PackPlan (CSR)
    PackPlan + flat token columns --materialize--> packed flat columns + row offsets + per-piece seq_lengths

Algorithms and complexity (n sequences, B bins, C capacity)
-----------------------------------------------------------
* Order: decreasing length, ties broken by the lower input index (a stable order, so results are deterministic).
  Lengths are bounded by C, so a counting sort gives the order in O(n + C); for very large C relative to n a stable
  ``np.argsort`` is used instead (O(n log n)).
* **FFD** (:func:`assign_ffd`): a max segment tree over bins holds each bin's remaining capacity; not-yet-opened bins
  hold C, so "leftmost bin with remaining >= length" is one root-to-leaf descent and automatically opens a new bin when
  no open bin fits.  The tree needs only as many leaves as bins can ever exist: in any first-fit packing at most one bin
  is at most half full, so B <= ceil(2 * tokens / C) (and B <= n).  Runs of equal length (lengths are integers, so
  1M sequences have only ~tens of thousands of distinct lengths) are placed a bin at a time: bins left of the chosen
  one cannot fit that length and only shrink, so the next equal item goes to the same bin while it fits, which is
  exactly item-by-item first fit.  O(n + R log B) time with R <= n (bin, run) pairs, O(B) memory; updates walk up
  only while a node's maximum changes.
* Both kernels work in placement order (sorted lengths in, bin per placement slot out) and the result is scattered
  back once with numpy: at 1M+ items, per-item random access by input index costs more than the tree search.
* **BFD** (:func:`assign_bfd`): global best fit, the same rule as TRL's ``_pack_bfd`` but over the whole set.  A max
  segment tree over *remaining-space values* 1..C finds the smallest remaining space >= length (value C is always
  present and means "open a new bin"); per value a FIFO linked list of bins resolves ties the way TRL does: among
  bins with the same (tightest) remaining space, the one that reached that space first.  O(n log C) time, O(n + C)
  memory (so capacity is limited to ``BFD_MAX_CAPACITY``).
* **wrapped**: concatenate all pieces and cut every C tokens (pieces may straddle rows); O(n + T/C).
* **none**: one piece per row.
The kernels are plain Python loops that are compiled with numba (``cache=True``, lazily on first use, so importing this
module stays cheap); without numba they run as pure Python, which is correct but ~100x slower.

Memory contract
---------------
Sequences are only ever referenced as ``(seq_index, start, length)`` slices of the caller's flat token arrays.  A
:class:`PackPlan` holds O(number of pieces) int64s (CSR: flat piece arrays + per-row offsets into them), never tokens.
:func:`materialize` allocates exactly one output array per token column (its final size) and fills it piece by piece
with a compiled copy loop, so peak memory is the input columns plus one packed copy plus O(pieces) bookkeeping; no
gather-index array of token size is built.

Row efficiency
--------------
``efficiency = tokens / (bins * capacity)`` for every strategy, where ``tokens`` is what is kept after the overflow
policy.  For ``none`` this is the fill of rows padded to ``capacity``; the padding a collator really adds depends on
how rows are batched (pad-to-longest per batch, or none at all in padding-free mode), so it is not a property of the
plan and is not reported here.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Strategy = Literal["ffd", "bfd", "wrapped", "none"]
OverflowPolicy = Literal["truncate", "split", "drop"]

STRATEGIES: tuple[str, ...] = ("ffd", "bfd", "wrapped", "none")
OVERFLOW_POLICIES: tuple[str, ...] = ("truncate", "split", "drop")

# A counting sort over lengths costs O(C) memory/time; above this ratio of C to n the stable argsort is cheaper.
_COUNTING_SORT_MAX_CAPACITY_RATIO = 8
_COUNTING_SORT_MIN_CAPACITY = 1 << 20
# bfd indexes bins by remaining space, O(capacity) memory (~32 bytes per token of capacity).
BFD_MAX_CAPACITY = 1 << 22

__all__ = [
    "BFD_MAX_CAPACITY",
    "OVERFLOW_POLICIES",
    "STRATEGIES",
    "OverflowResult",
    "PackPlan",
    "apply_overflow",
    "assign_bfd",
    "assign_ffd",
    "compile_kernels",
    "decreasing_order",
    "materialize",
    "pack_plan",
    "position_ids_from_seq_lengths",
]


# --------------------------------------------------------------------------------------------------------------------
# Kernels: plain Python that numba compiles.  Keep them to simple loops over numpy arrays so both modes agree.
# --------------------------------------------------------------------------------------------------------------------


def _counting_order_kernel(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices by decreasing length, ties by increasing index (a stable counting sort; lengths in 1..C), and the
    lengths in that order (written as runs, without a random-access gather)."""
    n = lengths.shape[0]
    counts = np.zeros(capacity + 1, np.int64)
    for i in range(n):
        counts[lengths[i]] += 1
    pos = np.zeros(capacity + 1, np.int64)  # pos[v] = number of items longer than v = first slot of length v
    sorted_lengths = np.empty(n, np.int64)
    acc = 0
    for v in range(capacity, 0, -1):
        pos[v] = acc
        for k in range(acc, acc + counts[v]):
            sorted_lengths[k] = v
        acc += counts[v]
    order = np.empty(n, np.int64)
    for i in range(n):
        v = lengths[i]
        order[pos[v]] = i
        pos[v] += 1
    return order, sorted_lengths


def _ffd_kernel(sorted_lengths: np.ndarray, capacity: int, n_leaves: int, bin_sorted: np.ndarray) -> int:
    """First fit over non-increasing lengths; writes the bin of the k-th item to bin_sorted[k] and returns #bins
    (-1 if the tree had too few leaves; the caller's bound makes that impossible, it is a guard).

    A max segment tree over bins holds remaining capacity (unopened bins hold C, so the descent opens a new bin when no
    open one fits).  Runs of equal length are placed a bin at a time: bins left of the chosen one cannot fit this
    length and only shrink, so the next equal item goes to the same bin while it fits; this gives exactly the
    item-by-item first-fit result with one tree update per (bin, run) instead of per item.
    """
    n = sorted_lengths.shape[0]
    tree = np.full(2 * n_leaves, capacity, np.int64)
    n_bins = 0
    k = 0
    while k < n:
        size = sorted_lengths[k]
        run_end = k + 1
        while run_end < n and sorted_lengths[run_end] == size:
            run_end += 1
        while k < run_end:
            if tree[1] < size:
                return -1
            node = 1
            while node < n_leaves:  # leftmost leaf whose remaining capacity fits
                node <<= 1
                if tree[node] < size:
                    node += 1
            b = node - n_leaves
            if b >= n_bins:
                n_bins = b + 1
            q = min(run_end - k, tree[node] // size)
            for j in range(k, k + q):
                bin_sorted[j] = b
            k += q
            tree[node] -= q * size
            node >>= 1
            while node >= 1:  # recompute maxima upward, stopping once a maximum is unchanged
                m = max(tree[2 * node], tree[2 * node + 1])
                if tree[node] == m:
                    break
                tree[node] = m
                node >>= 1
    return n_bins


def _bfd_kernel(sorted_lengths: np.ndarray, capacity: int, bin_sorted: np.ndarray) -> int:
    """Best fit over non-increasing lengths; writes bin_sorted[k], returns #bins.

    A max segment tree over remaining-space values 1..C (leaf v-1 holds v while some bin has exactly v tokens free,
    else 0) gives the tightest space >= size in one descent; value C is always present and means "open a new bin".
    Per value a FIFO linked list of bins (head/tail per value, nxt per bin) picks the bin that reached that space
    first, as TRL's deque does.
    """
    n = sorted_lengths.shape[0]
    n_leaves = 1
    while n_leaves < capacity:
        n_leaves <<= 1
    tree = np.zeros(2 * n_leaves, np.int64)
    head = np.full(capacity + 1, -1, np.int64)
    tail = np.full(capacity + 1, -1, np.int64)
    nxt = np.full(max(n, 1), -1, np.int64)
    node = n_leaves + capacity - 1
    while node >= 1:
        tree[node] = capacity
        node >>= 1
    n_bins = 0
    for k in range(n):
        size = sorted_lengths[k]
        node = 1
        while node < n_leaves:
            node <<= 1
            if tree[node] < size:
                node += 1
        space = tree[node]
        if space < capacity:
            b = head[space]
            h = nxt[b]
            head[space] = h
            nxt[b] = -1
            if h == -1:  # no bin left with this space: clear its leaf and recompute maxima upward
                tail[space] = -1
                node = n_leaves + space - 1
                tree[node] = 0
                node >>= 1
                while node >= 1:
                    m = max(tree[2 * node], tree[2 * node + 1])
                    if tree[node] == m:
                        break
                    tree[node] = m
                    node >>= 1
        else:
            b = n_bins
            n_bins += 1
        bin_sorted[k] = b
        space -= size
        if space > 0:
            t = tail[space]
            if t == -1:  # first bin with this space: set its leaf; maxima only grow
                head[space] = b
                node = n_leaves + space - 1
                tree[node] = space
                node >>= 1
                while node >= 1 and tree[node] < space:
                    tree[node] = space
                    node >>= 1
            else:
                nxt[t] = b
            tail[space] = b
    return n_bins


def _csr_kernel(bin_sorted: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Group placement positions by bin (counting sort), keeping placement order inside each bin."""
    counts = np.zeros(n_bins + 1, np.int64)
    for k in range(bin_sorted.shape[0]):
        counts[bin_sorted[k] + 1] += 1
    row_offsets = np.cumsum(counts)
    pos = row_offsets[:-1].copy()
    perm = np.empty(bin_sorted.shape[0], np.int64)
    for k in range(bin_sorted.shape[0]):
        b = bin_sorted[k]
        perm[pos[b]] = k
        pos[b] += 1
    return perm, row_offsets


def _gather_kernel(src: np.ndarray, src_start: np.ndarray, lengths: np.ndarray, out: np.ndarray) -> None:
    """Copy piece p = src[src_start[p] : src_start[p] + lengths[p]] to the next free slot of ``out`` (compiled).

    An explicit element loop with unsigned indices (no negative-index wraparound checks, so LLVM vectorises it): as
    fast as numba's slice assignment and ~20x quicker to compile.  Callers guarantee starts/lengths are in range."""
    d = np.uint64(0)
    for p in range(lengths.shape[0]):
        s = np.uint64(src_start[p])
        m = np.uint64(lengths[p])
        for j in range(m):
            out[d + j] = src[s + j]
        d += m


def _scatter_kernel(
    src: np.ndarray, src_start: np.ndarray, lengths: np.ndarray, out: np.ndarray, dst_start: np.ndarray
) -> None:
    """Copy piece p = src[src_start[p] : src_start[p] + lengths[p]] to out[dst_start[p] : ...] (compiled): the
    gather when the pieces of one output come from several sources, each filled in its own pass."""
    for p in range(lengths.shape[0]):
        s = np.uint64(src_start[p])
        d = np.uint64(dst_start[p])
        m = np.uint64(lengths[p])
        for j in range(m):
            out[d + j] = src[s + j]


def _gather_slices(src: np.ndarray, src_start: np.ndarray, lengths: np.ndarray, out: np.ndarray) -> None:
    """Same copies with numpy slice assignment: the uncompiled path (no numba, or non-numeric dtypes)."""
    d = 0
    for s, m in zip(src_start.tolist(), lengths.tolist(), strict=True):
        out[d : d + m] = src[s : s + m]
        d += m


_KERNEL_SOURCES: dict[str, Callable[..., Any]] = {
    "order": _counting_order_kernel,
    "ffd": _ffd_kernel,
    "bfd": _bfd_kernel,
    "csr": _csr_kernel,
    "gather": _gather_kernel,
    "scatter": _scatter_kernel,
}
_kernels: dict[str, Callable[..., Any]] = {}
_kernels_lock = threading.Lock()


def _kernel(name: str) -> Callable[..., Any]:
    """Compile (or load from numba's on-disk cache) lazily, so importing the module does not import numba (~0.4 s)."""
    fn = _kernels.get(name)
    if fn is not None:
        return fn
    with _kernels_lock:
        if not _kernels:
            try:
                import numba
            except ImportError:  # pragma: no cover - numba is a declared dependency
                warnings.warn(
                    "numba is not installed: sft_exp.data.packing runs its kernels as pure Python (~100x slower)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                _kernels.update(_KERNEL_SOURCES, gather=_gather_slices)
            else:
                jit = numba.njit(cache=True, nogil=True)
                _kernels.update({k: jit(v) for k, v in _KERNEL_SOURCES.items()})
        return _kernels[name]


def compile_kernels() -> float:
    """Compile (or load from cache) every kernel on tiny inputs; returns seconds taken.  Benchmarks call this first
    so the JIT cost is reported apart from the run time."""
    import time

    t0 = time.perf_counter()
    lengths = np.array([3, 1, 2], np.int64)
    assign_ffd(lengths, 4)
    assign_bfd(lengths, 4)
    plan = pack_plan(lengths, 4, "ffd")
    for dtype in (np.int32, np.int64, np.bool_):
        materialize(plan, {"x": np.zeros(6, dtype)}, np.array([0, 3, 4, 6]))
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------------------------


def _as_lengths(lengths: Any) -> np.ndarray:
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"lengths must be a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"lengths must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_capacity(capacity: int) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
        raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
    return int(capacity)


def _check_lengths(lengths: np.ndarray, capacity: int, allow_long: bool) -> None:
    """Raise naming the first offending sequence: an empty sequence is an upstream bug, and a too-long one needs an
    explicit overflow policy rather than silent truncation."""
    if lengths.size == 0:
        return
    bad = np.flatnonzero(lengths < 1)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"sequence {i} has length {int(lengths[i])}: every length must be >= 1 ({bad.size} invalid)")
    if not allow_long:
        bad = np.flatnonzero(lengths > capacity)
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"sequence {i} has length {int(lengths[i])} > capacity {capacity} ({bad.size} sequences too long); "
                f"pass overflow='truncate', 'split' or 'drop'"
            )


# --------------------------------------------------------------------------------------------------------------------
# Assignment
# --------------------------------------------------------------------------------------------------------------------


def _decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, lengths[order]) by decreasing length, ties by increasing index; lengths already validated."""
    n = lengths.shape[0]
    if capacity <= max(_COUNTING_SORT_MIN_CAPACITY, _COUNTING_SORT_MAX_CAPACITY_RATIO * n):
        return _kernel("order")(lengths, capacity)
    order = np.argsort(-lengths, kind="stable").astype(np.int64, copy=False)
    return order, lengths[order]


def decreasing_order(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Indices by decreasing length, ties by increasing index: the placement order of ffd and bfd."""
    capacity = _check_capacity(capacity)
    lengths = _as_lengths(lengths)
    _check_lengths(lengths, capacity, allow_long=False)
    if lengths.shape[0] == 0:
        return np.zeros(0, np.int64)
    return _decreasing(np.ascontiguousarray(lengths), capacity)[0]


def _ffd_leaf_bound(total: int, n: int, capacity: int) -> int:
    """Power of two >= the most bins first fit can open: at most one bin ends <= half full, so B <= ceil(2T/C)."""
    bound = max(1, min(n, -(-2 * total // capacity) + 1))
    return 1 << (bound - 1).bit_length()


def _assign_sorted(strategy: str, lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Core of ffd/bfd on validated lengths, working in placement order so the kernels read and write sequentially
    (random access by input index costs more than the tree search at 1M+ items): (order, bin_sorted, n_bins), where
    the item placed k-th is ``order[k]`` and went to bin ``bin_sorted[k]``."""
    n = lengths.shape[0]
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    order, sorted_lengths = _decreasing(np.ascontiguousarray(lengths), capacity)
    bin_sorted = np.empty(n, np.int64)
    if strategy == "ffd":
        n_leaves = _ffd_leaf_bound(int(lengths.sum()), n, capacity)
        n_bins = _kernel("ffd")(sorted_lengths, capacity, n_leaves, bin_sorted)
        while n_bins < 0:  # pragma: no cover - the bound is a theorem; this retry is a guard
            n_leaves *= 2
            n_bins = _kernel("ffd")(sorted_lengths, capacity, n_leaves, bin_sorted)
    elif strategy == "bfd":
        if capacity > BFD_MAX_CAPACITY:
            raise ValueError(
                f"bfd needs O(capacity) memory and supports capacity <= {BFD_MAX_CAPACITY}, got {capacity}; use ffd"
            )
        n_bins = _kernel("bfd")(sorted_lengths, capacity, bin_sorted)
    else:  # pragma: no cover
        raise ValueError(strategy)
    return order, bin_sorted, int(n_bins)


def _assign(strategy: str, lengths: np.ndarray, capacity: int) -> np.ndarray:
    capacity = _check_capacity(capacity)
    lengths = _as_lengths(lengths)
    _check_lengths(lengths, capacity, allow_long=False)
    order, bin_sorted, _ = _assign_sorted(strategy, lengths, capacity)
    bin_of = np.empty(lengths.shape[0], np.int64)
    bin_of[order] = bin_sorted
    return bin_of


def assign_ffd(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """First-fit-decreasing bin ids (int64, input order, bins numbered 0..B-1 in opening order).

    Every length must be in 1..capacity (ValueError naming the first offender otherwise; use :func:`pack_plan` with
    an overflow policy for longer sequences).  Deterministic: decreasing length, ties by index.
    """
    return _assign("ffd", lengths, capacity)


def assign_bfd(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """Global best-fit-decreasing bin ids; same contract as :func:`assign_ffd`.

    Each sequence goes to the open bin with the least remaining space that still fits it; among equally tight bins,
    the one that reached that remaining space first (TRL's tie rule).  Kept for comparison with TRL's chunked BFD.
    """
    return _assign("bfd", lengths, capacity)


# --------------------------------------------------------------------------------------------------------------------
# Overflow
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # numpy fields: no elementwise __eq__
class OverflowResult:
    """Pieces after applying an overflow policy, in input order (by seq_index, then start).

    ``seq_index[p], start[p], length[p]`` describe piece p as a slice of sequence ``seq_index[p]``; every piece is
    1..capacity long.  Counts are numbers of *input sequences* affected; ``tokens_lost`` counts tokens in no piece.
    """

    seq_index: np.ndarray
    start: np.ndarray
    length: np.ndarray
    truncated: int = 0
    split: int = 0
    dropped: int = 0
    tokens_lost: int = 0

    @property
    def num_pieces(self) -> int:
        return int(self.length.shape[0])

    def counts(self) -> dict[str, int]:
        return {
            "truncated": self.truncated,
            "split": self.split,
            "dropped": self.dropped,
            "tokens_lost": self.tokens_lost,
        }


def apply_overflow(lengths: np.ndarray, capacity: int, policy: OverflowPolicy | None) -> OverflowResult:
    """Describe sequences longer than ``capacity`` as pieces (no token data is touched).

    * ``truncate``: keep the first ``capacity`` tokens (as TRL's bfd does), lose the rest.
    * ``split``: cut into consecutive pieces of ``capacity`` tokens (the last one shorter); nothing is lost, but the
      pieces are packed as independent sequences (attention does not cross them).
    * ``drop``: leave the sequence out entirely.
    * ``None``: no policy; any sequence longer than ``capacity`` raises ValueError.
    Sequences of length <= capacity become one piece ``(i, 0, length)``; a length < 1 always raises.
    """
    capacity = _check_capacity(capacity)
    lengths = _as_lengths(lengths)
    if policy is not None and policy not in OVERFLOW_POLICIES:
        raise ValueError(f"unknown overflow policy {policy!r}; expected one of {OVERFLOW_POLICIES} or None")
    _check_lengths(lengths, capacity, allow_long=policy is not None)
    n = lengths.shape[0]
    long_mask = lengths > capacity
    n_long = int(np.count_nonzero(long_mask))
    index = np.arange(n, dtype=np.int64)
    if n_long == 0:
        return OverflowResult(index, np.zeros(n, np.int64), lengths.copy())
    excess = int((lengths[long_mask] - capacity).sum())
    if policy == "truncate":
        return OverflowResult(
            index, np.zeros(n, np.int64), np.minimum(lengths, capacity), truncated=n_long, tokens_lost=excess
        )
    if policy == "drop":
        keep = np.flatnonzero(~long_mask)
        return OverflowResult(
            keep,
            np.zeros(keep.shape[0], np.int64),
            lengths[keep].copy(),
            dropped=n_long,
            tokens_lost=int(lengths[long_mask].sum()),
        )
    # split
    n_pieces = -(-lengths // capacity)
    seq_index = np.repeat(index, n_pieces)
    first = np.cumsum(n_pieces) - n_pieces
    start = (np.arange(seq_index.shape[0], dtype=np.int64) - np.repeat(first, n_pieces)) * capacity
    length = np.minimum(capacity, lengths[seq_index] - start)
    return OverflowResult(seq_index, start, length, split=n_long)


# --------------------------------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # numpy fields: no elementwise __eq__
class PackPlan:
    """Which slices of which sequences make up each packed row, in CSR form.

    Pieces of row r are ``p in range(row_offsets[r], row_offsets[r + 1])``; piece p is tokens
    ``[start[p], start[p] + length[p])`` of sequence ``seq_index[p]``.  Inside a row, ffd/bfd pieces come in placement
    order (longest first), wrapped pieces in stream order.  All arrays are int64.
    """

    strategy: str
    capacity: int
    overflow: str | None
    num_sequences: int
    seq_index: np.ndarray
    start: np.ndarray
    length: np.ndarray
    row_offsets: np.ndarray
    overflow_counts: dict[str, int]
    bins: int
    tokens: int
    lower_bound: int
    efficiency: float

    @property
    def num_pieces(self) -> int:
        return int(self.length.shape[0])

    @property
    def row_lengths(self) -> np.ndarray:
        """Tokens per row (int64, one per bin)."""
        cum = np.concatenate(([0], np.cumsum(self.length)))
        return np.diff(cum[self.row_offsets])

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(seq_index, start, length) views of row r's pieces."""
        a, b = int(self.row_offsets[r]), int(self.row_offsets[r + 1])
        return self.seq_index[a:b], self.start[a:b], self.length[a:b]

    def summary(self) -> dict[str, Any]:
        """Scalar stats, e.g. for logging to the tracker."""
        return {
            "strategy": self.strategy,
            "capacity": self.capacity,
            "overflow": self.overflow,
            "sequences": self.num_sequences,
            "pieces": self.num_pieces,
            "bins": self.bins,
            "tokens": self.tokens,
            "lower_bound": self.lower_bound,
            "bins_over_lower_bound": (self.bins / self.lower_bound - 1.0) if self.lower_bound else 0.0,
            "efficiency": self.efficiency,
            **self.overflow_counts,
        }


def _make_plan(
    strategy: str,
    capacity: int,
    overflow: str | None,
    num_sequences: int,
    seq_index: np.ndarray,
    start: np.ndarray,
    length: np.ndarray,
    row_offsets: np.ndarray,
    counts: dict[str, int],
) -> PackPlan:
    tokens = int(length.sum())
    bins = int(row_offsets.shape[0] - 1)
    return PackPlan(
        strategy=strategy,
        capacity=capacity,
        overflow=overflow,
        num_sequences=num_sequences,
        seq_index=seq_index,
        start=start,
        length=length,
        row_offsets=row_offsets,
        overflow_counts=counts,
        bins=bins,
        tokens=tokens,
        lower_bound=-(-tokens // capacity),
        efficiency=tokens / (bins * capacity) if bins else 1.0,
    )


def _wrap(pieces: OverflowResult, capacity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cut the concatenated piece stream every ``capacity`` tokens; the last row keeps the remainder."""
    cum = np.concatenate(([0], np.cumsum(pieces.length)))
    total = int(cum[-1])
    if total == 0:
        z = np.zeros(0, np.int64)
        return z, z, z, np.zeros(1, np.int64)
    cuts = np.arange(0, total, capacity, dtype=np.int64)
    # Segment starts = piece starts merged with row cuts that are not already piece starts (np.insert at sorted
    # positions is a linear merge; np.union1d would hash and sort, ~20x slower at 1M+ pieces).
    at = np.searchsorted(cum, cuts)
    new_cut = cum[at] != cuts
    bounds = np.insert(cum[:-1], at[new_cut], cuts[new_cut])
    ends = np.append(bounds[1:], total)
    p = np.searchsorted(cum, bounds, side="right") - 1
    seq_index = pieces.seq_index[p]
    start = pieces.start[p] + (bounds - cum[p])
    length = ends - bounds
    row_offsets = np.append(np.searchsorted(bounds, cuts), bounds.shape[0]).astype(np.int64)
    return seq_index, start, length, row_offsets


def pack_plan(
    lengths: np.ndarray,
    capacity: int,
    strategy: Strategy = "ffd",
    overflow: OverflowPolicy | None = None,
) -> PackPlan:
    """Plan packed rows of at most ``capacity`` tokens from per-sequence lengths.

    ``strategy``: ``ffd`` (global first-fit-decreasing), ``bfd`` (global best-fit-decreasing), ``wrapped`` (concatenate
    and cut every ``capacity`` tokens; the last row may be short) or ``none`` (one piece per row).  ``overflow`` is
    applied first (see :func:`apply_overflow`); with ``wrapped``, ``None`` and ``split`` both just let long sequences
    be cut by the wrapping, since a wrapped stream has no per-sequence limit.

    Args:
        lengths: tokens of each sequence (int array), in the order the rows were selected.
        capacity: tokens per packed row (packing.max_length).
        strategy: how sequences are assigned to rows (above).
        overflow: what happens to a sequence longer than ``capacity``: ``truncate``, ``split`` or ``drop``.

    Returns:
        A PackPlan: ``row_offsets`` (piece range of each row), ``seq_index`` / ``start`` / ``length`` (each piece: its
        sequence, first token and length), ``bins`` and ``efficiency`` (tokens / (bins x capacity)).

    Example:
        >>> p = pack_plan(np.array([5, 3, 4, 2]), 8, "ffd")
        >>> p.bins, p.row_offsets.tolist(), p.length.tolist(), round(p.efficiency, 3)
        (2, [0, 2, 4], [5, 3, 4, 2], 0.875)
    """
    capacity = _check_capacity(capacity)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown packing strategy {strategy!r}; expected one of {STRATEGIES}")
    lengths = _as_lengths(lengths)
    n = lengths.shape[0]
    if strategy == "wrapped" and overflow in (None, "split"):
        _check_lengths(lengths, capacity, allow_long=True)
        pieces = OverflowResult(np.arange(n, dtype=np.int64), np.zeros(n, np.int64), lengths.copy())
    else:
        pieces = apply_overflow(lengths, capacity, overflow)
    counts = pieces.counts()
    if strategy == "wrapped":
        seq_index, start, length, row_offsets = _wrap(pieces, capacity)
        return _make_plan(strategy, capacity, overflow, n, seq_index, start, length, row_offsets, counts)
    if strategy == "none":
        row_offsets = np.arange(pieces.num_pieces + 1, dtype=np.int64)
        return _make_plan(
            strategy, capacity, overflow, n, pieces.seq_index, pieces.start, pieces.length, row_offsets, counts
        )
    order, bin_sorted, n_bins = _assign_sorted(strategy, pieces.length, capacity)
    if pieces.num_pieces == 0:
        items, row_offsets = np.zeros(0, np.int64), np.zeros(1, np.int64)
    else:
        perm, row_offsets = _kernel("csr")(bin_sorted, n_bins)
        items = order[perm]
    return _make_plan(
        strategy,
        capacity,
        overflow,
        n,
        pieces.seq_index[items],
        pieces.start[items],
        pieces.length[items],
        row_offsets,
        counts,
    )


# --------------------------------------------------------------------------------------------------------------------
# Materialisation
# --------------------------------------------------------------------------------------------------------------------

_RESERVED_KEYS = ("row_offsets", "seq_lengths", "seq_offsets", "position_ids")


def materialize(
    plan: PackPlan,
    token_columns: Mapping[str, np.ndarray],
    offsets: np.ndarray,
    *,
    with_position_ids: bool = False,
) -> dict[str, np.ndarray]:
    """Gather packed rows from flat per-token columns, one output allocation per column.

    ``token_columns`` maps names (``input_ids``, a labels mask, ``source_id``...) to flat 1-D arrays that share
    ``offsets`` (int, ``num_sequences + 1`` entries: sequence i is ``column[offsets[i]:offsets[i + 1]]``).

    Returns a dict with each column packed flat (same dtype), plus
    ``row_offsets`` (R + 1 token offsets: row r is ``packed[row_offsets[r]:row_offsets[r + 1]]``),
    ``seq_lengths`` (flat per-piece lengths, for position ids that restart at 0 on every piece) and
    ``seq_offsets`` (R + 1 offsets into ``seq_lengths``: row r's pieces), and ``position_ids`` (int64) if asked.
    ``seq_lengths``/``seq_offsets`` are the plan's own arrays (not copies).
    """
    offsets = np.asarray(offsets)
    if offsets.ndim != 1 or offsets.shape[0] != plan.num_sequences + 1:
        raise ValueError(f"offsets must have num_sequences + 1 = {plan.num_sequences + 1} entries, got {offsets.shape}")
    if not np.issubdtype(offsets.dtype, np.integer):
        raise TypeError(f"offsets must be integers, got dtype {offsets.dtype}")
    offsets = offsets.astype(np.int64, copy=False)
    if offsets.shape[0] > 1 and (offsets[0] < 0 or np.any(np.diff(offsets) < 0)):
        raise ValueError("offsets must be non-negative and non-decreasing")
    for name in token_columns:
        if name in _RESERVED_KEYS:
            raise ValueError(f"token column name {name!r} is reserved for materialize's outputs")
    # Every piece must lie inside its sequence.
    if plan.num_pieces:
        seq_len = offsets[plan.seq_index + 1] - offsets[plan.seq_index]
        bad = np.flatnonzero(plan.start + plan.length > seq_len)
        if bad.size:
            p = int(bad[0])
            i = int(plan.seq_index[p])
            raise ValueError(
                f"plan piece {p} reads tokens [{int(plan.start[p])}, {int(plan.start[p] + plan.length[p])}) of "
                f"sequence {i}, which has only {int(seq_len[p])} tokens: the plan does not match these offsets"
            )
    src_start = offsets[plan.seq_index] + plan.start
    total = plan.tokens
    need = int(offsets[-1])
    out: dict[str, np.ndarray] = {}
    gather = _kernel("gather")
    for name, column in token_columns.items():
        column = np.asarray(column)
        if column.ndim != 1 or column.shape[0] < need:
            raise ValueError(f"token column {name!r} must be 1-D with >= {need} entries, got shape {column.shape}")
        packed = np.empty(total, column.dtype)
        if column.dtype.kind in "biuf":
            gather(np.ascontiguousarray(column), src_start, plan.length, packed)
        else:  # e.g. object/str columns: same copies, uncompiled
            _gather_slices(column, src_start, plan.length, packed)
        out[name] = packed
    cum = np.concatenate(([0], np.cumsum(plan.length)))
    out["row_offsets"] = cum[plan.row_offsets]
    out["seq_lengths"] = plan.length
    out["seq_offsets"] = plan.row_offsets
    if with_position_ids:
        out["position_ids"] = position_ids_from_seq_lengths(plan.length)
    return out


def position_ids_from_seq_lengths(seq_lengths: np.ndarray, dtype: Any = np.int64) -> np.ndarray:
    """``[0..l0-1, 0..l1-1, ...]`` for flat per-piece lengths, built in one array (ones, resets, in-place cumsum)."""
    seq_lengths = _as_lengths(seq_lengths)
    if np.any(seq_lengths < 0):
        raise ValueError("seq_lengths must be non-negative")
    seq_lengths = seq_lengths[seq_lengths > 0]
    total = int(seq_lengths.sum())
    pos = np.ones(total, dtype)
    if total == 0:
        return pos
    starts = np.cumsum(seq_lengths)[:-1]
    pos[0] = 0
    pos[starts] = 1 - seq_lengths[:-1]
    np.cumsum(pos, out=pos)
    return pos


def scatter(
    src: np.ndarray, src_start: np.ndarray, lengths: np.ndarray, out: np.ndarray, dst_start: np.ndarray
) -> None:
    """out[dst_start[p] : dst_start[p] + lengths[p]] = src[src_start[p] : src_start[p] + lengths[p]] for every p.

    `src` may be a memory-mapped (read-only) view; only the pieces are read. Callers guarantee ranges are valid."""
    if len(lengths) == 0:
        return
    _kernel("scatter")(
        np.ascontiguousarray(src),
        np.ascontiguousarray(src_start, dtype=np.int64),
        np.ascontiguousarray(lengths, dtype=np.int64),
        out,
        np.ascontiguousarray(dst_start, dtype=np.int64),
    )
