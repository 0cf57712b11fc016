"""sweep=mixture_random's draw, mixsearch's fit / propose / refusals on synthetic sweeps with a known answer, and
mixture.resample_each_epoch's purity and resume (sft_exp/data/mixture.py, sft_exp/tools/mixsearch.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sft_exp.config import ConfigError, to_run_config
from sft_exp.data.mixture import draw_shares, epoch_report, select_mixture, take, take_epoch
from sft_exp.tools import mixsearch as ms
from tests.conftest import compose

SOURCES = ["a", "b", "c", "d"]
TRUE = {"a": -0.30, "b": 0.20, "c": 0.0, "d": 0.05}  # objective = 3 + sum TRUE[s] * log(share): more a helps


def _write_sweep(d: Path, n: int, *, total_tokens: int = 1000, weighting: str = "proportion", noise: float = 0.0,
                 sources: list[str] | None = None, budgets: list[int] | None = None) -> Path:  # fmt: skip
    """A fake finished sweep: per run mixture_stats.json (realised trained tokens), metrics.json, and the index."""
    rng = np.random.default_rng(1)
    runs = {}
    for i in range(n):
        names = sources or SOURCES
        shares = rng.dirichlet(np.ones(len(names)))
        budget = budgets[i] if budgets else total_tokens
        y = 3 + sum(TRUE.get(s, 0.0) * np.log(max(v, 1e-4)) for s, v in zip(names, shares)) + noise * rng.normal()
        rd = d / f"mixture.draw={i}"
        rd.mkdir(parents=True)
        stats = {
            "mixture": {"weighting": weighting, "total_tokens": budget, "total_rows": None, "seed": 0},
            "sources": {
                s: {"rows_in_source": 100, "rows_dropped": 0, "rows_heldout": 8, "rows": 10, "weight": float(v),
                    "epochs": 0.1, "tokens": 100, "trained_tokens": int(round(v * budget)), "think_share": 0.0,
                    "mean_length": 10.0, "p50_length": 10, "p95_length": 10, "max_length": 10, "cache": "hit"}
                for s, v in zip(names, shares)
            },  # fmt: skip
            "template_check": None, "total": {}, "packing": {"efficiency": 1.0}, "cache": {}, "seconds": {},
        }  # fmt: skip
        (rd / "mixture_stats.json").write_text(json.dumps(stats))
        losses = {"all": float(y), **{s: float(y) for s in names}}
        (rd / "metrics.json").write_text(json.dumps({"eval_loss_after": losses, "eval_loss_before": losses}))
        runs[rd.name] = {"dir": rd.name, "job_num": i, "status": "finished", "final": {"eval_loss_after": losses}}
    index = {"sweep_dir": str(d), "objective": "all", "overrides": ["sweep=mixture_random", "train.max_steps=5"]}
    (d / "sweep_index.json").write_text(json.dumps({**index, "status": "finished", "runs": runs}))
    return d


# ------------------------------------------------------------------------------------------------------ the draw
def test_draw_shares_pure_within_bounds_and_sums_to_one() -> None:
    lo, hi = {"a": 0.1, "c": 0.05}, {"b": 0.3, "d": 0.4}
    draws = [draw_shares(SOURCES, i, seed=3, min_share=lo, max_share=hi) for i in range(200)]
    for x in draws:
        assert abs(sum(x.values()) - 1) < 1e-9
        assert all(x[s] >= v - 1e-12 for s, v in lo.items()) and all(x[s] <= v + 1e-12 for s, v in hi.items())
    assert draws[7] == draw_shares(list(reversed(SOURCES)), 7, seed=3, min_share=lo, max_share=hi)  # order-free
    assert draws[7] != draw_shares(SOURCES, 7, seed=4, min_share=lo, max_share=hi)
    with pytest.raises(ConfigError, match="minimum shares add up"):
        draw_shares(SOURCES, 0, min_share={"a": 0.7, "b": 0.5})
    with pytest.raises(ConfigError, match="not sources"):
        draw_shares(SOURCES, 0, max_share={"zz": 0.5})


def test_preset_draw_sets_weights_and_refuses_fraction_weighting() -> None:
    run = to_run_config(compose(["sweep=mixture_random", "mixture.draw=2", "+mixture.search.max_share.tools=0.2"]))
    w = {n: s.weight for n, s in run.mixture.sources.items()}
    assert abs(sum(w.values()) - 1) < 1e-9 and w["tools"] <= 0.2 and run.mixture.weighting.value == "proportion"
    assert w == draw_shares(list(w), 2, max_share={"tools": 0.2})
    with pytest.raises(ConfigError, match="weighting=proportion"):
        to_run_config(compose(["mixture.draw=1"]))


def test_preset_sweeps_trials_draws() -> None:
    cfg = compose(["sweep=mixture_random", "sweep.trials=5"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params["mixture.draw"] == "range(0,5)"


# ------------------------------------------------------------------------------------------------------ the fit
def test_fit_recovers_known_effects_and_proposes_more_of_the_helpful_source(tmp_path: Path) -> None:
    d = _write_sweep(tmp_path / "sw", 16)
    code, rep = ms.run(d, None, 3, tmp_path / "out")
    assert code == 0, rep["verdict"]
    assert rep["loo"]["ridge_log_share"]["r2"] > 0.95 and rep["loo"]["ridge_log_share"]["spearman"] > 0.9
    assert rep["model"]["name"] == "ridge_log_share"  # the true model is linear in log-shares
    eff = rep["effects"]
    assert eff["a"]["helps"] and eff["a"]["sign"] == "-" and eff["b"]["sign"] == "+" and not eff["b"]["helps"]
    best = rep["observed_best"]["value"]
    assert len(rep["proposals"]) == 3 and rep["proposals"][0]["predicted"] <= best + 1e-6
    top = rep["proposals"][0]["shares"]
    assert top["a"] == max(top.values()) and top["b"] < 0.1 and top["d"] < 0.1  # b and d hurt: as little as seen
    text = (tmp_path / "out" / "sweep" / "proposals.yaml").read_text()
    assert text.startswith("# @package _global_") and "range(0,3)" in text and "total_tokens: 1000" in text
    assert "sweep=proposals train.max_steps=5" in rep["command"]
    assert (tmp_path / "out" / "pred_vs_observed.png").exists() and (tmp_path / "out" / "fit.json").exists()
    # the proposals compose as the sweep preset they claim to be
    import yaml

    pts = yaml.safe_load(text)["mixture"]["search"]["points"]
    assert pts[0] == top


def test_too_few_runs_and_noise_propose_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ms.main([str(_write_sweep(tmp_path / "few", 4)), "--out", str(tmp_path / "o1")]) == 1
    assert "too few finished runs: 4" in capsys.readouterr().err
    noisy = _write_sweep(tmp_path / "noisy", 10, noise=50.0)
    code, rep = ms.run(noisy, None, 3, tmp_path / "o2")
    assert code == 1 and "no better than predicting the mean" in rep["verdict"] and rep["proposals"] == []
    assert not (tmp_path / "o2" / "sweep" / "proposals.yaml").exists()


@pytest.mark.parametrize(
    "kind,match",
    [
        ("no_index", "no sweep_index.json"),
        ("fraction", "weighting=proportion"),
        ("budgets", "different token budgets"),
        ("objective", "no finished run recorded the objective 'gen/all/score'"),
    ],
)
def test_bad_sweeps_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, match: str) -> None:
    d = tmp_path / "sw"
    if kind == "no_index":
        d.mkdir()
    elif kind == "fraction":
        _write_sweep(d, 6, weighting="fraction")
    elif kind == "budgets":
        _write_sweep(d, 6, budgets=[1000, 1000, 2000, 1000, 2000, 1000])
    else:
        _write_sweep(d, 6)
    args = [str(d)] + (["--objective", "gen/all/score"] if kind == "objective" else [])
    assert ms.main(args) == 2
    assert match in capsys.readouterr().err


def test_compare_plots_on_a_mixture_sweep(tmp_path: Path) -> None:
    paths = ms.compare_plots(_write_sweep(tmp_path / "sw", 5), tmp_path / "cmp")
    assert [p.name for p in paths] == ["source_loss_vs_share.png", "eval_before_after.png"]
    assert ms.compare_plots(tmp_path, tmp_path / "cmp2") == []  # not a sweep: nothing, no error


# ------------------------------------------------------------------------------------------------------ epochs
def test_resample_each_epoch_is_pure_fresh_and_resumable() -> None:
    trained = {"frac": np.ones(100, dtype=np.int64), "up": np.ones(10, dtype=np.int64)}
    sel = select_mixture(trained, {"frac": 0.3, "up": 2.5}, 0.0, 7, "fraction")
    # a fraction source: epochs 0..2 are disjoint subsets of its pool (fresh rows), epoch 0 is the recipe's subset
    e = [sel["frac"].epoch_rows(7, "frac", k) for k in range(3)]
    assert e[0].tolist() == sel["frac"].train.tolist() and all(len(x) == 30 for x in e)
    assert len(set(np.concatenate(e).tolist())) == 90
    # an upsampled source (2.5 copies per epoch): over 2 epochs every row appears exactly 5 times
    up = np.concatenate([sel["up"].epoch_rows(7, "up", k) for k in range(2)])
    assert np.bincount(up).tolist() == [5] * 10
    # the stream is one sequence: epoch windows are slices of it, computed alone (a resumed process)
    stream = take(np.arange(100), 300, 7, "frac")
    assert take_epoch(np.arange(100), 30, 7, "frac", 2).tolist() == stream[60:90].tolist()
    # resume in the middle of epoch 2 (index 1): a fresh selection gives the same rows from the cut on
    fresh = select_mixture(trained, {"frac": 0.3, "up": 2.5}, 0.0, 7, "fraction")
    for name in trained:
        uninterrupted = [sel[name].epoch_rows(7, name, k) for k in range(3)][1]
        assert fresh[name].epoch_rows(7, name, 1)[12:].tolist() == uninterrupted[12:].tolist()
    rep = epoch_report(sel, 7, 3)
    assert rep["frac"] == {"rows": [30, 30, 30], "new_rows": [30, 30, 30]} and rep["up"]["new_rows"] == [10, 0, 0]


def test_resample_each_epoch_in_the_data_stage_and_resume(tmp_path: Path) -> None:
    """prepare_data: set_epoch(1) trains other rows than epoch 0; a second preparation (a resumed process) gives
    epoch 1's rows identically from any batch on; mixture_stats reports rows per epoch."""
    from sft_exp.data.pipeline import prepare_data
    from sft_exp.train.model import build_tokenizer

    over = [f"mixture.sources.{s}.weight=0" for s in ("arith", "count", "reverse", "sort", "tools")]
    run = to_run_config(
        compose(
            [
                *over,
                "mixture.sources.units.weight=0.1",
                "mixture.resample_each_epoch=true",
                "train.num_train_epochs=3",
                "packing.max_length=512",
            ]
        )  # fmt: skip
    )
    tok = build_tokenizer(run)
    first, again = prepare_data(run, tok, tmp_path, verbose=False), prepare_data(run, tok, tmp_path, verbose=False)
    ids = [list(map(tuple, first.train["input_ids"]))]
    first.train.set_epoch(1)
    ids.append(list(map(tuple, first.train["input_ids"])))
    assert len(ids[1]) == len(ids[0]) and set(ids[0]).isdisjoint(ids[1])  # fresh rows (packed rows differ)
    again.train.set_epoch(1)  # resumed in the middle of epoch 1 (0-based): the rows from batch 3 on are the same
    assert [tuple(again.train[i]["input_ids"]) for i in range(3, len(ids[1]))] == ids[1][3:]
    first.train.set_epoch(0)
    assert list(map(tuple, first.train["input_ids"])) == ids[0]
    per_epoch = first.stats.mixture["rows_per_epoch"]["units"]
    assert per_epoch["rows"][0] == per_epoch["rows"][2] > 0 and per_epoch["new_rows"] == per_epoch["rows"]


@pytest.mark.parametrize(
    "launcher,trials",
    [
        ("basic", 3),  # Hydra's basic launcher: the runs one after the other in the launching process
        # submitit on this host: one process per run, all at once (2, one thread each: a 2-core machine)
        pytest.param("submitit_local", 2, marks=pytest.mark.slow),
    ],
)
def test_real_mixture_random_sweep_end_to_end(tmp_path: Path, shared_cache: Path, launcher: str, trials: int) -> None:
    """Tiny runs of sweep=mixture_random: each trains its own drawn mixture at the same budget; mixsearch reads
    their realised shares and losses and refuses to propose from so few runs (exit 1), saying so. The same through
    submitit's local launcher (tests/test_slurm_train.py runs the preset through launcher=slurm)."""
    from sft_exp.tools.sweep_index import load_index
    from tests.conftest import launch

    sweep = tmp_path / "sweep"
    # submitit_local: hydra.launcher.cpus_per_task is the jobs' thread count (they run at once on this host)
    extra = [] if launcher == "basic" else [f"hydra/launcher={launcher}", "hydra.launcher.cpus_per_task=1"]
    r = launch(["sweep=mixture_random", f"sweep.trials={trials}", "mixture.total_tokens=1000",
                f"hydra.sweep.dir={sweep}", f"cache_dir={shared_cache}", "train.max_steps=2",
                "mixture.test_split_size=4", "packing.max_length=256", *extra], tmp_path, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    if launcher != "basic":
        logs = [p.read_text() for p in sweep.glob(".submitit/*/*_log.out")]
        assert len(logs) == trials and all("slurm task: 1 torch thread(s)" in log for log in logs), logs
    index = load_index(sweep, write=False)
    assert index["launcher"] == {"basic": "BasicLauncher", "submitit_local": "LocalLauncher"}[launcher]
    assert index["status"] == "finished" and index["swept"] == ["mixture.draw"]
    runs = sorted(index["runs"].values(), key=lambda e: e["job_num"])
    want = [({"mixture.draw": str(i)}, "finished") for i in range(trials)]
    assert [(e["swept"], e["status"]) for e in runs] == want
    pids = {e["pid"] for e in runs}
    assert pids == {index["launcher_pid"]} if launcher == "basic" else len(pids - {index["launcher_pid"]}) == trials
    study = ms.load_study(sweep)
    assert len(study.runs) == trials and study.budget["total_tokens"] == 1000
    assert len({tuple(np.round(x, 3)) for x in study.shares}) == trials  # as many different realised mixtures
    assert np.allclose(study.shares.sum(1), 1)
    code, rep = ms.run(sweep, None, 2, None)
    assert code == 1 and rep["verdict"].startswith(f"too few finished runs: {trials}")
    assert (sweep / "mixsearch" / "fit.json").exists()
