"""Tests for sft_exp.data.packing: exactness against simple O(n*B) references, overflow handling, materialisation."""

from __future__ import annotations

from collections import defaultdict, deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sft_exp.data import packing
from sft_exp.data.packing import (
    PackPlan,
    apply_overflow,
    assign_bfd,
    assign_ffd,
    decreasing_order,
    materialize,
    pack_plan,
    position_ids_from_seq_lengths,
)

# --------------------------------------------------------------------------------------------------------------------
# Pure-Python references: obviously correct, quadratic.
# --------------------------------------------------------------------------------------------------------------------


def ref_order(lengths: list[int]) -> list[int]:
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def ref_ffd(lengths: list[int], capacity: int) -> list[int]:
    remaining: list[int] = []
    out = [-1] * len(lengths)
    for i in ref_order(lengths):
        for b, r in enumerate(remaining):
            if r >= lengths[i]:
                remaining[b] -= lengths[i]
                out[i] = b
                break
        else:
            remaining.append(capacity - lengths[i])
            out[i] = len(remaining) - 1
    return out


def ref_bfd(lengths: list[int], capacity: int) -> list[int]:
    """Tightest bin that fits; ties go to the bin that has had that remaining space the longest (TRL's FIFO rule)."""
    remaining: list[int] = []
    since: list[int] = []  # step at which the bin reached its current remaining space
    out = [-1] * len(lengths)
    for step, i in enumerate(ref_order(lengths)):
        size = lengths[i]
        fits = [(remaining[b], since[b], b) for b in range(len(remaining)) if remaining[b] >= size]
        if fits:
            b = min(fits)[2]
        else:
            remaining.append(capacity)
            since.append(step)
            b = len(remaining) - 1
        remaining[b] -= size
        since[b] = step
        out[i] = b
    return out


def trl_bfd_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """TRL 1.16 _pack_bfd's loop (dict-of-deques), transcribed, with our stable tie order; returns bins of indices."""
    space_to_bin: dict[int, deque] = defaultdict(deque)
    bins: list[dict] = []
    for idx in ref_order(lengths):
        length = lengths[idx]
        candidates = [s for s, q in space_to_bin.items() if q and 0 < s < capacity and s >= length]
        space = min(candidates) if candidates else capacity
        if space < capacity:
            b = space_to_bin[space].popleft()
        else:
            b = {"ids": [], "length": 0}
            bins.append(b)
        b["ids"].append(idx)
        b["length"] += length
        space_to_bin[space - length].append(b)
    return [b["ids"] for b in bins]


def check_assignment(bin_of: np.ndarray, lengths: np.ndarray, capacity: int) -> None:
    assert bin_of.dtype == np.int64
    assert bin_of.shape == lengths.shape
    if lengths.size == 0:
        return
    n_bins = int(bin_of.max()) + 1
    assert set(np.unique(bin_of).tolist()) == set(range(n_bins)), "bins must be numbered 0..B-1 without gaps"
    loads = np.bincount(bin_of, weights=lengths, minlength=n_bins)
    assert loads.max() <= capacity


def plan_invariants(plan: PackPlan, lengths: np.ndarray) -> None:
    assert plan.row_offsets[0] == 0 and plan.row_offsets[-1] == plan.num_pieces
    assert np.all(np.diff(plan.row_offsets) >= 1), "no empty rows"
    assert plan.bins == len(plan.row_offsets) - 1
    rl = plan.row_lengths
    assert rl.max(initial=0) <= plan.capacity
    assert plan.tokens == int(plan.length.sum()) == int(rl.sum())
    assert plan.lower_bound == -(-plan.tokens // plan.capacity)
    assert plan.bins >= plan.lower_bound
    if plan.bins:
        assert plan.efficiency == pytest.approx(plan.tokens / (plan.bins * plan.capacity))
    assert np.all(plan.length >= 1) and np.all(plan.start >= 0)
    assert np.all(plan.start + plan.length <= lengths[plan.seq_index])


lengths_strategy = st.lists(st.integers(1, 40), min_size=0, max_size=120)


# --------------------------------------------------------------------------------------------------------------------
# Assignment
# --------------------------------------------------------------------------------------------------------------------


def test_ffd_hand_computed() -> None:
    # Decreasing: 8(i6) 7(i3) 5(i1) 4(i2) 3(i5) 2(i0) 1(i4) into capacity 10:
    # 8 -> bin0 (2 left); 7 -> bin1 (3 left); 5 -> bin2 (5 left); 4 -> bin2 (1 left); 3 -> bin1 (0 left);
    # 2 -> bin0 (0 left); 1 -> bin2 (0 left).  Three full bins.
    lengths = np.array([2, 5, 4, 7, 1, 3, 8])
    assert assign_ffd(lengths, 10).tolist() == [0, 2, 2, 1, 2, 1, 0]


def test_ffd_and_bfd_differ_where_they_should() -> None:
    # Capacity 7, decreasing 5 3 3 1: 5 -> bin0 (2 left); 3 -> bin1 (4 left); 3 -> bin1 (1 left).
    # The 1 goes to the first bin that fits under first fit (bin0), to the tightest under best fit (bin1).
    lengths = np.array([5, 3, 3, 1])
    assert assign_ffd(lengths, 7).tolist() == [0, 1, 1, 0]
    assert assign_bfd(lengths, 7).tolist() == [0, 1, 1, 1]


def test_bfd_tie_goes_to_bin_that_reached_the_space_first() -> None:
    # Capacity 10, decreasing 6 6 4 2 2 2: 6 -> b0 (4), 6 -> b1 (4), 4 -> tightest with 4 left: b0 (FIFO) -> 0 left;
    # 2 -> b1 (2 left); 2 -> b1 (0 left); 2 -> new bin2.
    assert assign_bfd(np.array([6, 6, 4, 2, 2, 2]), 10).tolist() == [0, 1, 0, 1, 1, 2]
    # 5 5 3 2 1 at capacity 8: b0 5 (3), b1 5 (3); 3 -> b0 (0); 2 -> b1 (1); 1 -> b1 (0).
    assert assign_bfd(np.array([5, 5, 3, 2, 1]), 8).tolist() == [0, 1, 0, 1, 1]


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_strategy, capacity=st.integers(40, 100))
def test_ffd_matches_reference(lengths: list[int], capacity: int) -> None:
    arr = np.array(lengths, dtype=np.int64)
    got = assign_ffd(arr, capacity)
    check_assignment(got, arr, capacity)
    assert got.tolist() == ref_ffd(lengths, capacity)


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_strategy, capacity=st.integers(40, 100))
def test_bfd_matches_reference(lengths: list[int], capacity: int) -> None:
    arr = np.array(lengths, dtype=np.int64)
    got = assign_bfd(arr, capacity)
    check_assignment(got, arr, capacity)
    assert got.tolist() == ref_bfd(lengths, capacity)


@settings(max_examples=100, deadline=None)
@given(lengths=lengths_strategy, capacity=st.integers(40, 100))
def test_bfd_matches_trl_loop(lengths: list[int], capacity: int) -> None:
    """Same bins as TRL's own best-fit loop would build over the whole set (no 1000-row chunks)."""
    got = assign_bfd(np.array(lengths, dtype=np.int64), capacity)
    bins = trl_bfd_bins(lengths, capacity)
    assert len(bins) == (int(got.max()) + 1 if lengths else 0)
    for b, ids in enumerate(bins):
        assert sorted(ids) == np.flatnonzero(got == b).tolist()


@pytest.mark.parametrize("seed", range(5))
def test_random_larger_inputs_match_reference(seed: int) -> None:
    """Bigger n with many equal lengths (exercises the run batching in the ffd kernel) and a non-power-of-2 C."""
    rng = np.random.default_rng(seed)
    capacity = int(rng.integers(50, 700))
    lengths = np.minimum(rng.geometric(0.02, size=1500), capacity)
    for fn, ref in ((assign_ffd, ref_ffd), (assign_bfd, ref_bfd)):
        got = fn(lengths, capacity)
        check_assignment(got, lengths, capacity)
        assert got.tolist() == ref(lengths.tolist(), capacity)


def test_pure_python_kernels_agree_with_compiled() -> None:
    """The kernels are also valid pure Python (the fallback without numba): same answers."""
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 60, size=300).astype(np.int64)
    order, sorted_lengths = packing._counting_order_kernel(lengths, 64)
    assert order.tolist() == ref_order(lengths.tolist())
    assert sorted_lengths.tolist() == lengths[order].tolist()
    for name, kernel, args in (
        ("ffd", packing._ffd_kernel, (sorted_lengths, 64, 512)),
        ("bfd", packing._bfd_kernel, (sorted_lengths, 64)),
    ):
        py, jit = np.empty(300, np.int64), np.empty(300, np.int64)
        assert kernel(*args, py) == packing._kernel(name)(*args, jit)
        assert py.tolist() == jit.tolist()


def test_pure_python_fallback_end_to_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the uncompiled kernels installed (what happens without numba), plans and packed rows are identical."""
    rng = np.random.default_rng(5)
    lengths = rng.integers(1, 90, size=200)
    columns, offsets = flat_tokens(lengths)
    compiled = {s: pack_plan(lengths, 64, s, "split") for s in ("ffd", "bfd")}
    packed = {s: materialize(p, columns, offsets) for s, p in compiled.items()}
    monkeypatch.setattr(packing, "_kernels", dict(packing._KERNEL_SOURCES, gather=packing._gather_slices))
    for s, plan in compiled.items():
        py_plan = pack_plan(lengths, 64, s, "split")
        for field in ("seq_index", "start", "length", "row_offsets"):
            assert np.array_equal(getattr(py_plan, field), getattr(plan, field))
        out = materialize(py_plan, columns, offsets)
        for name in columns:
            assert np.array_equal(out[name], packed[s][name])
    src = np.arange(50, dtype=np.int32)
    starts, lens = np.array([40, 3, 10], np.int64), np.array([5, 2, 7], np.int64)
    a, b = np.empty(14, np.int32), np.empty(14, np.int32)
    packing._gather_kernel(src, starts, lens, a)  # the compiled kernel's source, run as Python
    packing._gather_slices(src, starts, lens, b)
    assert a.tolist() == b.tolist() == [40, 41, 42, 43, 44, 3, 4, 10, 11, 12, 13, 14, 15, 16]


def test_assignment_is_deterministic_and_tie_stable() -> None:
    lengths = np.array([3, 3, 3, 3, 3, 3])
    assert assign_ffd(lengths, 6).tolist() == [0, 0, 1, 1, 2, 2]
    assert decreasing_order(np.array([2, 5, 2, 5, 1]), 5).tolist() == [1, 3, 0, 2, 4]
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 1000, size=5000)
    assert np.array_equal(assign_ffd(lengths, 4096), assign_ffd(lengths.copy(), 4096))


def test_large_capacity_uses_argsort_path() -> None:
    lengths = np.array([5, 1 << 30, 7, 5])
    assert decreasing_order(lengths, 1 << 31).tolist() == [1, 2, 0, 3]
    assert assign_ffd(lengths, 1 << 31).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="bfd needs O\\(capacity\\) memory"):
        assign_bfd(lengths, 1 << 31)


def test_every_sequence_once_and_capacity_respected_at_scale() -> None:
    rng = np.random.default_rng(1)
    capacity = 4096
    lengths = np.clip(rng.lognormal(np.log(600) - 0.5, 1.0, 50_000), 1, capacity).astype(np.int64)
    for fn in (assign_ffd, assign_bfd):
        bin_of = fn(lengths, capacity)
        check_assignment(bin_of, lengths, capacity)
        lb = -(-int(lengths.sum()) // capacity)
        assert bin_of.max() + 1 <= lb * 1.01 + 1


def test_dtypes_and_empty() -> None:
    for dtype in (np.int16, np.int32, np.int64, np.uint32):
        assert assign_ffd(np.array([2, 5, 4, 7, 1, 3, 8], dtype=dtype), 10).tolist() == [0, 2, 2, 1, 2, 1, 0]
    assert assign_ffd(np.array([], dtype=np.int64), 10).shape == (0,)
    assert assign_bfd([], 10).shape == (0,)
    assert assign_ffd([4, 4], 8).tolist() == [0, 0]


# --------------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [assign_ffd, assign_bfd])
def test_error_names_offending_index_and_length(fn) -> None:
    with pytest.raises(ValueError, match=r"sequence 2 has length 0"):
        fn(np.array([3, 4, 0, 5]), 10)
    with pytest.raises(ValueError, match=r"sequence 1 has length -3"):
        fn(np.array([3, -3, 0]), 10)
    with pytest.raises(ValueError, match=r"sequence 3 has length 11 > capacity 10 \(2 sequences too long\)"):
        fn(np.array([3, 4, 10, 11, 12]), 10)


def test_errors_without_overflow_policy() -> None:
    with pytest.raises(ValueError, match=r"sequence 1 has length 9 > capacity 8.*overflow="):
        pack_plan(np.array([8, 9]), 8, "ffd")
    with pytest.raises(ValueError, match=r"sequence 1 has length 9 > capacity 8"):
        apply_overflow(np.array([8, 9]), 8, None)
    with pytest.raises(ValueError, match=r"sequence 0 has length 0"):
        pack_plan(np.array([0, 9]), 8, "none", "truncate")
    with pytest.raises(ValueError, match=r"sequence 0 has length 0"):
        pack_plan(np.array([0]), 8, "wrapped")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="capacity"):
        assign_ffd([1], 0)
    with pytest.raises(ValueError, match="capacity"):
        assign_ffd([1], True)
    with pytest.raises(TypeError, match="integers"):
        assign_ffd(np.array([1.5]), 4)
    with pytest.raises(ValueError, match="1-D"):
        assign_ffd(np.ones((2, 2), np.int64), 4)
    with pytest.raises(ValueError, match="unknown packing strategy"):
        pack_plan([1], 4, "bfd_split")
    with pytest.raises(ValueError, match="unknown overflow policy"):
        pack_plan([1], 4, "ffd", "wrap")


# --------------------------------------------------------------------------------------------------------------------
# Overflow
# --------------------------------------------------------------------------------------------------------------------


def test_overflow_truncate() -> None:
    res = apply_overflow(np.array([5, 12, 10, 25]), 10, "truncate")
    assert res.seq_index.tolist() == [0, 1, 2, 3]
    assert res.start.tolist() == [0, 0, 0, 0]
    assert res.length.tolist() == [5, 10, 10, 10]
    assert res.counts() == {"truncated": 2, "split": 0, "dropped": 0, "tokens_lost": 2 + 15}


def test_overflow_split() -> None:
    res = apply_overflow(np.array([5, 12, 10, 25]), 10, "split")
    assert res.seq_index.tolist() == [0, 1, 1, 2, 3, 3, 3]
    assert res.start.tolist() == [0, 0, 10, 0, 0, 10, 20]
    assert res.length.tolist() == [5, 10, 2, 10, 10, 10, 5]
    assert res.counts() == {"truncated": 0, "split": 2, "dropped": 0, "tokens_lost": 0}


def test_overflow_drop() -> None:
    res = apply_overflow(np.array([5, 12, 10, 25]), 10, "drop")
    assert res.seq_index.tolist() == [0, 2]
    assert res.length.tolist() == [5, 10]
    assert res.counts() == {"truncated": 0, "split": 0, "dropped": 2, "tokens_lost": 37}


@pytest.mark.parametrize("policy", [None, "truncate", "split", "drop"])
def test_overflow_noop_when_all_fit(policy) -> None:
    res = apply_overflow(np.array([5, 10, 1]), 10, policy)
    assert res.seq_index.tolist() == [0, 1, 2] and res.length.tolist() == [5, 10, 1]
    assert res.counts() == {"truncated": 0, "split": 0, "dropped": 0, "tokens_lost": 0}


@pytest.mark.parametrize("strategy", ["ffd", "bfd", "none"])
def test_plan_overflow_counts(strategy) -> None:
    lengths = np.array([5, 12, 10, 25, 3])
    plan = pack_plan(lengths, 10, strategy, "split")
    plan_invariants(plan, lengths)
    assert plan.tokens == lengths.sum() and plan.overflow_counts["split"] == 2
    assert plan.num_pieces == 8
    plan = pack_plan(lengths, 10, strategy, "truncate")
    assert plan.tokens == 38 and plan.overflow_counts["tokens_lost"] == 17
    plan = pack_plan(lengths, 10, strategy, "drop")
    assert plan.tokens == 18 and sorted(set(plan.seq_index.tolist())) == [0, 2, 4]


# --------------------------------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------------------------------


def test_plan_ffd_rows_match_assignment() -> None:
    lengths = np.array([2, 5, 4, 7, 1, 3, 8])
    plan = pack_plan(lengths, 10, "ffd")
    plan_invariants(plan, lengths)
    rows = [plan.row(r)[0].tolist() for r in range(plan.bins)]
    assert rows == [[6, 0], [3, 5], [1, 2, 4]]  # placement (decreasing) order inside each row
    assert plan.bins == plan.lower_bound == 3 and plan.efficiency == 1.0
    assert plan.summary()["bins_over_lower_bound"] == 0.0


@settings(max_examples=100, deadline=None)
@given(lengths=lengths_strategy, capacity=st.integers(40, 100), strategy=st.sampled_from(["ffd", "bfd"]))
def test_plan_rows_are_the_assignment(lengths: list[int], capacity: int, strategy: str) -> None:
    arr = np.array(lengths, dtype=np.int64)
    plan = pack_plan(arr, capacity, strategy)
    if lengths:
        plan_invariants(plan, arr)
    bin_of = (assign_ffd if strategy == "ffd" else assign_bfd)(arr, capacity)
    assert plan.bins == (int(bin_of.max()) + 1 if lengths else 0)
    for r in range(plan.bins):
        seqs = plan.row(r)[0].tolist()
        assert sorted(seqs) == np.flatnonzero(bin_of == r).tolist()
        assert seqs == sorted(seqs, key=lambda i: (-arr[i], i))
    assert sorted(plan.seq_index.tolist()) == list(range(len(lengths)))


def test_wrapped_cuts_exactly_at_capacity() -> None:
    lengths = np.array([4, 7, 3, 9, 2])  # 25 tokens, capacity 6 -> rows of 6,6,6,6,1
    plan = pack_plan(lengths, 6, "wrapped")
    plan_invariants(plan, lengths)
    assert plan.row_lengths.tolist() == [6, 6, 6, 6, 1]
    assert plan.bins == 5 == plan.lower_bound
    pieces = list(zip(plan.seq_index.tolist(), plan.start.tolist(), plan.length.tolist(), strict=True))
    assert pieces == [(0, 0, 4), (1, 0, 2), (1, 2, 5), (2, 0, 1), (2, 1, 2), (3, 0, 4), (3, 4, 5), (4, 0, 1), (4, 1, 1)]
    assert plan.row_offsets.tolist() == [0, 2, 4, 6, 8, 9]


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 60), min_size=1, max_size=60), capacity=st.integers(1, 50))
def test_wrapped_stream_property(lengths: list[int], capacity: int) -> None:
    arr = np.array(lengths, dtype=np.int64)
    plan = pack_plan(arr, capacity, "wrapped")  # long sequences are fine: wrapping cuts them
    plan_invariants(plan, arr)
    rl = plan.row_lengths
    assert np.all(rl[:-1] == capacity) and 1 <= rl[-1] <= capacity
    stream = [(i, t) for i, length in enumerate(lengths) for t in range(length)]
    got = [(s, t) for s, a, m in zip(plan.seq_index, plan.start, plan.length, strict=True) for t in range(a, a + m)]
    assert got == stream


def test_wrapped_with_truncate_and_drop() -> None:
    lengths = np.array([4, 12, 3])
    assert pack_plan(lengths, 5, "wrapped", "truncate").tokens == 12
    assert pack_plan(lengths, 5, "wrapped", "drop").tokens == 7
    assert pack_plan(lengths, 5, "wrapped", "split").tokens == 19


def test_none_is_one_sequence_per_row() -> None:
    lengths = np.array([3, 8, 1])
    plan = pack_plan(lengths, 8, "none")
    plan_invariants(plan, lengths)
    assert plan.bins == 3 and plan.row_offsets.tolist() == [0, 1, 2, 3]
    assert plan.seq_index.tolist() == [0, 1, 2] and plan.row_lengths.tolist() == [3, 8, 1]
    assert plan.efficiency == pytest.approx(12 / (3 * 8))
    plan = pack_plan(np.array([3, 20]), 8, "none", "split")
    assert plan.row_lengths.tolist() == [3, 8, 8, 4]


@pytest.mark.parametrize("strategy", ["ffd", "bfd", "wrapped", "none"])
def test_empty_plan(strategy) -> None:
    plan = pack_plan(np.zeros(0, np.int64), 8, strategy)
    assert plan.bins == 0 and plan.tokens == 0 and plan.row_offsets.tolist() == [0]
    out = materialize(plan, {"input_ids": np.zeros(0, np.int32)}, np.zeros(1, np.int64))
    assert out["input_ids"].shape == (0,) and out["row_offsets"].tolist() == [0]


def test_ffd_near_lower_bound_on_many_small_sequences() -> None:
    rng = np.random.default_rng(2)
    lengths = np.clip(rng.lognormal(np.log(1300) - 0.5, 1.0, 100_000), 16, 131072).astype(np.int64)
    plan = pack_plan(lengths, 65536, "ffd", "truncate")
    assert plan.efficiency >= 0.999
    assert plan.bins <= plan.lower_bound * 1.001 + 1
    assert plan.overflow_counts["truncated"] == int((lengths > 65536).sum())


# --------------------------------------------------------------------------------------------------------------------
# Materialisation
# --------------------------------------------------------------------------------------------------------------------


def flat_tokens(lengths: np.ndarray, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    total = int(offsets[-1])
    columns = {
        "input_ids": rng.integers(0, 50_000, size=total).astype(np.int32),
        "labels_mask": rng.random(total) < 0.5,
        "source_id": np.repeat(np.arange(len(lengths), dtype=np.int64), lengths),
    }
    return columns, offsets


@pytest.mark.parametrize("strategy", ["ffd", "bfd", "none", "wrapped"])
@pytest.mark.parametrize("overflow", [None, "split"])
def test_materialize_round_trip(strategy: str, overflow: str | None) -> None:
    rng = np.random.default_rng(11)
    capacity = 64
    lengths = rng.integers(1, 64 if overflow is None else 150, size=400)
    columns, offsets = flat_tokens(lengths)
    plan = pack_plan(lengths, capacity, strategy, overflow)
    out = materialize(plan, columns, offsets, with_position_ids=True)
    row_off, seq_lengths, seq_off = out["row_offsets"], out["seq_lengths"], out["seq_offsets"]
    assert row_off[0] == 0 and row_off[-1] == plan.tokens == sum(lengths)
    assert np.all(np.diff(row_off) <= capacity)
    assert np.array_equal(np.diff(row_off), plan.row_lengths)
    # Each row's seq_lengths add up to the row length.
    for r in range(plan.bins):
        assert seq_lengths[seq_off[r] : seq_off[r + 1]].sum() == row_off[r + 1] - row_off[r]
    # Concatenating every piece's tokens (sorted back by (sequence, start)) gives back every sequence exactly.
    piece_off = np.concatenate(([0], np.cumsum(seq_lengths)))
    for name, col in columns.items():
        assert out[name].dtype == col.dtype
        chunks = {}
        for p in range(plan.num_pieces):
            chunks[(int(plan.seq_index[p]), int(plan.start[p]))] = out[name][piece_off[p] : piece_off[p + 1]]
        rebuilt = np.concatenate([chunks[k] for k in sorted(chunks)])
        assert np.array_equal(rebuilt, col)
    # source_id is constant inside each piece and equals the piece's sequence.
    assert np.array_equal(out["source_id"], np.repeat(plan.seq_index, plan.length))
    # Position ids restart at 0 on every piece.
    pos = out["position_ids"]
    assert np.array_equal(pos[piece_off[:-1]], np.zeros(plan.num_pieces))
    assert np.array_equal(pos, np.concatenate([np.arange(m) for m in seq_lengths]))


def test_materialize_truncate_keeps_prefix() -> None:
    lengths = np.array([3, 12, 5])
    columns, offsets = flat_tokens(lengths)
    plan = pack_plan(lengths, 8, "ffd", "truncate")
    out = materialize(plan, {"input_ids": columns["input_ids"]}, offsets)
    # rows: [seq1[:8]], [seq2, seq0]
    ids = columns["input_ids"]
    expected = np.concatenate([ids[3:11], ids[15:20], ids[0:3]])
    assert np.array_equal(out["input_ids"], expected)
    assert out["row_offsets"].tolist() == [0, 8, 16]
    assert out["seq_lengths"].tolist() == [8, 5, 3]


def test_materialize_validates() -> None:
    lengths = np.array([3, 4])
    columns, offsets = flat_tokens(lengths)
    plan = pack_plan(lengths, 8, "ffd")
    with pytest.raises(ValueError, match="num_sequences \\+ 1"):
        materialize(plan, columns, offsets[:-1])
    with pytest.raises(ValueError, match="does not match these offsets"):
        materialize(plan, columns, np.array([0, 3, 5]))
    with pytest.raises(ValueError, match="reserved"):
        materialize(plan, {"seq_lengths": columns["input_ids"]}, offsets)
    with pytest.raises(ValueError, match="1-D"):
        materialize(plan, {"input_ids": columns["input_ids"][:3]}, offsets)


def test_materialize_object_column_and_non_zero_offsets() -> None:
    words = np.array(["a", "b", "c", "d", "e", "f"], dtype=object)
    plan = pack_plan(np.array([2, 3]), 5, "ffd")
    out = materialize(plan, {"w": words}, np.array([1, 3, 6]))
    assert out["w"].tolist() == ["d", "e", "f", "b", "c"]


def test_position_ids_from_seq_lengths() -> None:
    assert position_ids_from_seq_lengths(np.array([3, 1, 2])).tolist() == [0, 1, 2, 0, 0, 1]
    assert position_ids_from_seq_lengths(np.array([0, 2, 0, 1])).tolist() == [0, 1, 0]
    assert position_ids_from_seq_lengths(np.array([], np.int64)).shape == (0,)
    assert position_ids_from_seq_lengths(np.array([2, 2]), dtype=np.int32).dtype == np.int32
