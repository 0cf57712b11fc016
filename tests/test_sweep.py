"""Sweeps: the index (locking, reconciliation, rebuild), the presets, a real multirun of the tiny default with its
index and compare report, a failing combination, and the Optuna sweeper minimising a per-source eval loss."""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from sft_exp.config import ConfigError, to_run_config, validate
from sft_exp.launch.sweep_callback import swept_keys
from sft_exp.tools.sweep_index import INDEX, SweepIndex, load_index, rebuild, run_name
from tests.conftest import CONF, PY, REPO, compose, launch


def sweep_args(fast_args: list[str], sweep_dir: Path, steps: int = 2) -> list[str]:
    """fast_args for a multirun: the runs land under sweep_dir instead of hydra.run.dir."""
    args = [
        a for a in fast_args if not a.startswith(("hydra.run.dir=", "train.max_steps=", "mixture.test_split_size="))
    ]
    # 2 held-out rows per source: evaluating every source before and after training is most of a tiny run's time
    args += ["mixture.test_split_size=2", f"train.max_steps={steps}", "train.logging_steps=1"]
    return [*args, f"hydra.sweep.dir={sweep_dir}"]


# ------------------------------------------------------------------------------------------------------ unit
def test_swept_keys_from_command_line_and_sweeper_params() -> None:
    keys = swept_keys(
        ["train.learning_rate=1e-3,3e-3", "cache_dir=/tmp/c", "+x.y=interval(0,1)", "packing=ffd,bfd"],
        {"mixture.sources.arith.weight": "0.5,1", "train.learning_rate": "1e-3"},
    )
    assert keys == ["train.learning_rate", "x.y", "packing", "mixture.sources.arith.weight"]
    assert (
        run_name({"train.learning_rate": "0.001", "mixture.sources.arith.weight": "2"}, "x")
        == "lr=0.001,arith.weight=2"
    )


def test_run_dirnames_are_the_overrides_unless_too_long_for_a_file_name() -> None:
    from sft_exp.config.naming import run_dirname

    assert run_dirname("train.learning_rate=0.001,mixture.sources.tools.weight=2", 0) == (
        "train.learning_rate=0.001,mixture.sources.tools.weight=2"
    )
    assert "/" not in run_dirname("mixture.sources.x.path=/data/x.jsonl", 0)
    optuna = ",".join(f"mixture.sources.s{i}.weight=0.59393215353459{i}" for i in range(12))
    a, b = run_dirname(optuna, 3), run_dirname(optuna.replace("=0.5", "=0.4"), 3)
    assert a.startswith("3_s0.weight=0.5939,") and len(a) <= 200 and a != b


def _record_many(sweep_dir: str, worker: int, n: int) -> None:
    idx = SweepIndex(sweep_dir)
    for i in range(n):
        idx.record_run(Path(sweep_dir) / f"w{worker}-r{i}", status="finished", job_num=worker * 100 + i)


def test_index_updates_from_concurrent_processes_lose_nothing(tmp_path: Path) -> None:
    """Jobs on other processes (or nodes) record themselves under a file lock: no update is lost, no file torn."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_record_many, args=(str(tmp_path), w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    data = json.loads((tmp_path / INDEX).read_text())
    assert len(data["runs"]) == 60 and all(e["status"] == "finished" for e in data["runs"].values())


def _fake_run(run_dir: Path, overrides: list[str], metrics: dict | None) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "run_config.yaml").write_text("mode: train\n")
    (run_dir / "run_info.json").write_text(json.dumps({"overrides": overrides, "started": "t"}))
    if metrics is not None:
        (run_dir / "metrics.json").write_text(json.dumps(metrics))


def test_index_reconciles_killed_and_unrecorded_runs_and_rebuilds(tmp_path: Path) -> None:
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    idx = SweepIndex(tmp_path)
    _fake_run(tmp_path / "a", ["x=1"], {"eval_loss_after": {"all": 2.0}, "global_steps": 3})
    _fake_run(tmp_path / "b", ["x=2"], None)
    _fake_run(tmp_path / "c", ["x=3"], {"eval_loss_after": {"all": 1.5}})
    import socket

    # a finished its training but its process was killed before it recorded the end; b's process died mid-run;
    # c never reached the index at all; the launcher itself is gone.
    idx.set_header(swept=["x"], status="running", launcher_host=socket.gethostname(), launcher_pid=dead.pid)
    idx.record_run(tmp_path / "a", status="running", host=socket.gethostname(), pid=dead.pid)
    idx.record_run(tmp_path / "b", status="running", host=socket.gethostname(), pid=dead.pid)
    data = load_index(tmp_path)
    runs = data["runs"]
    assert runs["a"]["status"] == "finished" and runs["a"]["final"]["objective"] == 2.0
    assert runs["b"]["status"] == "died"
    assert runs["c"]["status"] == "finished" and runs["c"]["overrides"] == ["x=3"]
    assert data["status"] == "ended"
    assert json.loads((tmp_path / INDEX).read_text())["runs"]["b"]["status"] == "died"  # written back
    # lost index: rebuilt from the run directories alone
    (tmp_path / INDEX).unlink()
    again = rebuild(tmp_path)
    assert set(again["runs"]) == {"a", "b", "c"}
    assert again["runs"]["c"]["final"]["objective"] == 1.5 and again["runs"]["b"]["status"] == "unknown"


def _hydra_compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sft_exp.config.hydra_glue import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "sweep").glob("*.yaml")))
def test_sweep_presets_are_multiruns_with_params(preset: str) -> None:
    cfg = _hydra_compose([f"sweep={preset}"])
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweeper.params, "a preset sweeps something"
    if preset.startswith("optuna"):
        assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "minimize"
        assert cfg.hydra.sweeper.storage is None  # in memory: optuna 2's SQL layer is opt-in
    for key in cfg.hydra.sweeper.params:
        assert key in {"train.learning_rate", "mixture.draw"} or key.startswith("mixture.sources."), key


def test_objective_must_be_all_or_a_source() -> None:
    validate(to_run_config(compose(["sweep.objective=arith"])))
    with pytest.raises(ConfigError, match="sweep.objective: 'nope' is neither 'all' nor a source"):
        validate(to_run_config(compose(["sweep.objective=nope"])))


# ------------------------------------------------------------------------------------------------------ e2e
def _png_size(path: Path) -> tuple[int, int]:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    img = mpimg.imread(path)
    return img.shape[1], img.shape[0]


@pytest.mark.slow
def test_multirun_of_the_default_indexes_and_compares(tmp_path: Path, fast_args: list[str]) -> None:
    """sweep=lr_grid (a multirun without -m), its grid replaced and crossed with a mixture weight: 4 real runs."""
    sweep = tmp_path / "sweep"
    args = ["sweep=lr_grid", "train.learning_rate=1e-3,3e-3", "mixture.sources.tools.weight=0.5,2"]
    r = launch([*args, *sweep_args(fast_args, sweep)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]

    data = json.loads((sweep / INDEX).read_text())
    assert data["status"] == "finished" and data["sweeper"] == "BasicSweeper"
    assert data["swept"] == ["train.learning_rate", "mixture.sources.tools.weight"]
    assert len(data["runs"]) == 4
    combos = set()
    for key, e in data["runs"].items():
        assert e["status"] == "finished", e
        # run directories are named after the overrides (not after the cache path: a path would nest directories)
        assert f"train.learning_rate={e['swept']['train.learning_rate']}" in key and "cache_dir" not in key
        assert e["name"].startswith("lr=") and ",tools.weight=" in e["name"]
        f = e["final"]
        assert f["objective"] == f["eval_loss_after"]["all"] and f["global_steps"] == 2
        assert set(f["eval_loss_after"]) >= {"arith", "tools", "all"}
        combos.add((e["swept"]["train.learning_rate"], e["swept"]["mixture.sources.tools.weight"]))
        frozen = yaml.safe_load((sweep / key / "run_config.yaml").read_text())
        assert frozen["tracking"]["name"] == e["name"] and frozen["tracking"]["group"] == data["group"]
    assert combos == {("0.001", "0.5"), ("0.001", "2"), ("0.003", "0.5"), ("0.003", "2")}
    assert "sweep index:" in r.stdout and "compare:" in r.stdout

    c = subprocess.run([PY, "-m", "sft_exp.tools.compare", str(sweep)], capture_output=True, text=True, cwd=REPO)
    assert c.returncode == 0, c.stderr[-3000:]
    lines = [ln for ln in c.stdout.splitlines() if ln.startswith("lr=")]
    assert len(lines) == 4 and sum(ln.rstrip().endswith("*") for ln in lines) == 1
    rows = list(csv.DictReader(open(sweep / "compare.csv")))
    assert len(rows) == 4 and {"lr", "tools.weight", "eval_all", "eval_arith", "tokens_per_s", "wall_s"} <= set(rows[0])
    best = min(rows, key=lambda r: float(r["eval_all"]))
    assert best["best"] == "*" and all(r["best"] == "" for r in rows if r is not best)
    assert all(float(r["tokens_per_s"]) > 0 and float(r["wall_s"]) > 0 for r in rows)
    md = (sweep / "compare.md").read_text()
    assert f"Best: **{best['run']}**" in md and md.count("\n| lr=") == 4
    for png in (
        "loss_curves.png",
        "final_eval_vs_train.learning_rate.png",
        "final_eval_vs_mixture.sources.tools.weight.png",
    ):
        assert f"]({png})" in md
        w, h = _png_size(sweep / png)
        assert w > 800 and h > 300

    # the index outlives the launcher: rebuilt from the run directories alone, it says the same
    (sweep / INDEX).unlink()
    s = subprocess.run(
        [PY, "-m", "sft_exp.tools.sweep_index", str(sweep), "--rebuild"], capture_output=True, text=True, cwd=REPO
    )
    assert s.returncode == 0, s.stderr
    again = json.loads((sweep / INDEX).read_text())
    assert {k: e["swept"] for k, e in again["runs"].items()} == {k: e["swept"] for k, e in data["runs"].items()}
    assert all(e["status"] == "finished" for e in again["runs"].values())


@pytest.mark.slow
def test_jobs_in_other_processes_index_themselves_and_a_failure_fails_its_job_only(
    tmp_path: Path, fast_args: list[str]
) -> None:
    """submitit's local launcher runs the jobs as separate processes at once: each records itself in the index."""
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=submitit_local", "mode=prepare", "mixture.sources.tools.weight=-1,1"]
    r = launch([*args, *sweep_args(fast_args, sweep)], cwd=tmp_path)
    assert r.returncode != 0  # the sweep as a whole says something failed
    data = load_index(sweep)
    assert data["launcher"] == "LocalLauncher"
    runs = sorted(data["runs"].values(), key=lambda e: e["job_num"])
    assert [e["status"] for e in runs] == ["failed", "finished"]  # the other job still ran
    assert "mixture.sources.tools.weight: must be a number >= 0" in runs[0]["error"]
    assert (sweep / runs[1]["dir"] / "mixture_stats.json").exists()
    assert len({e["pid"] for e in runs} | {data["launcher_pid"]}) == 3  # three processes wrote the one index
    assert data["status"] == "ended"  # the launcher exited on the failure without on_multirun_end


@pytest.mark.slow
def test_optuna_minimises_a_per_source_eval_loss_and_tracks_the_sweep(tmp_path: Path, fast_args: list[str]) -> None:
    sweep = tmp_path / "sweep"
    args = ["sweep=optuna_lr", "hydra.sweeper.n_trials=2", "sweep.objective=arith", "tracking=wandb"]
    args += ["tracking.mode=offline"]
    r = launch([*args, *sweep_args(fast_args, sweep)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    data = json.loads((sweep / INDEX).read_text())
    assert data["sweeper"] == "OptunaSweeper" and data["swept"] == ["train.learning_rate"]
    assert data["objective"] == "arith" and len(data["runs"]) == 2
    objectives = []
    for e in data["runs"].values():
        assert e["status"] == "finished"
        f = e["final"]
        assert f["objective"] == f["eval_loss_after"]["arith"] != f["eval_loss_after"]["all"]
        objectives.append(f["objective"])
        assert 3e-4 <= float(e["swept"]["train.learning_rate"]) <= 3e-2
        # W&B: one run per trial, named after the swept value, grouped by the sweep
        wb = list((sweep / e["dir"] / "wandb").glob("offline-run-*"))
        assert len(wb) == 1
        rec = _wandb_run_record(wb[0])
        assert rec["run_group"] == data["group"] and rec["display_name"] == e["name"] and rec["job_type"] == "train"
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(objectives), rel=1e-6)


def _wandb_run_record(offline_run: Path) -> dict:
    out = subprocess.run(
        [str(Path(PY).parent / "wandb"), "leet", "inspect", "--json", str(offline_run)],
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert out.returncode == 0, out.stderr
    for line in out.stdout.splitlines():
        rec = json.loads(line)
        if rec.get("type") == "run":
            return rec["run"]
    raise AssertionError("no run record")
