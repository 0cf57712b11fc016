"""Mixture selection: explicit weight units, seeded and independent of listing order, held-out rows first."""

from __future__ import annotations

import numpy as np
import pytest

from sft_exp.config import ConfigError, to_run_config, validate
from sft_exp.data.mixture import held_out_count, select_mixture, split_heldout
from tests.conftest import compose

TRAINED = {
    "a": np.full(100, 10, dtype=np.int64),
    "b": np.arange(1, 201, dtype=np.int64),
    "c": np.full(50, 3, dtype=np.int64),
}


def test_fraction_keeps_floor_w_rows_and_upsamples() -> None:
    sel = select_mixture(TRAINED, {"a": 0.5, "b": 2.5, "c": 0.0}, 10, 0, "fraction")
    assert len(sel["a"].train) == 45  # floor(0.5 x 90 rows left after 10 held out)
    assert len(set(sel["a"].train.tolist())) == 45  # a subset, no repeats
    counts = np.bincount(sel["b"].train, minlength=200)
    pool = np.setdiff1d(np.arange(200), sel["b"].eval)
    assert len(sel["b"].train) == int(2.5 * 190) and set(counts[pool]) == {2, 3}  # whole copies + a remainder
    assert len(sel["c"].train) == 0 and len(sel["c"].eval) == 10  # weight 0: dropped, still evaluated
    assert sel["b"].epochs == pytest.approx(2.5)


def test_heldout_rows_never_train_and_do_not_depend_on_weights() -> None:
    one = select_mixture(TRAINED, {"a": 1, "b": 1, "c": 1}, 0.1, 7, "fraction")
    two = select_mixture(TRAINED, {"a": 3, "b": 0.2, "c": 0}, 0.1, 7, "fraction")
    for n in TRAINED:
        assert np.array_equal(one[n].eval, two[n].eval)
        assert not set(one[n].eval.tolist()) & set(one[n].train.tolist())


def test_same_seed_same_mixture_whatever_the_listing_order() -> None:
    w = {"a": 0.7, "b": 1.3, "c": 1.0}
    fwd = select_mixture(TRAINED, w, 5, 3, "fraction")
    rev = select_mixture(dict(reversed(list(TRAINED.items()))), dict(reversed(list(w.items()))), 5, 3, "fraction")
    other = select_mixture(TRAINED, w, 5, 4, "fraction")
    for n in TRAINED:
        assert np.array_equal(fwd[n].train, rev[n].train) and np.array_equal(fwd[n].eval, rev[n].eval)
    assert not np.array_equal(fwd["b"].train, other["b"].train)


def test_proportion_of_a_row_budget() -> None:
    sel = select_mixture(TRAINED, {"a": 1, "b": 2, "c": 1}, 0, 0, "proportion", total_rows=1000)
    assert [len(sel[n].train) for n in "abc"] == [250, 500, 250]
    assert sel["c"].epochs == pytest.approx(5.0)  # 250 rows from a 50-row source


def test_proportion_of_a_trained_token_budget() -> None:
    sel = select_mixture(TRAINED, {"a": 1, "b": 1, "c": 2}, 0, 0, "proportion", total_tokens=4000)
    for name, share in (("a", 0.25), ("b", 0.25), ("c", 0.5)):
        got = int(TRAINED[name][sel[name].train].sum())
        assert got >= share * 4000
        assert got - int(TRAINED[name][sel[name].train[-1]]) < share * 4000  # the shortest prefix that reaches it


def test_held_out_count_units() -> None:
    assert held_out_count(1000, 0.05) == 50 and held_out_count(1000, 32) == 32 and held_out_count(10, 0) == 0
    with pytest.raises(ValueError, match="would hold out all"):
        held_out_count(10, 10)
    ev, pool = split_heldout(100, 0.1, 0, "x")
    assert len(ev) == 10 and len(pool) == 90 and not set(ev) & set(pool)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["mixture.weighting=proportion"], "set exactly one of mixture.total_rows or mixture.total_tokens"),
        (["mixture.total_rows=10"], "only apply to mixture.weighting=proportion"),
        (["mixture.weighting=proportion", "mixture.total_tokens=-5"], "mixture.total_tokens: must be > 0"),
    ],
)
def test_budget_validation(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate(to_run_config(compose(overrides)))
    assert needle in str(e.value)
