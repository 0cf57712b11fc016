"""compare: run directories -> table, compare.md, compare.csv, PNGs; swept keys found by diffing frozen configs.

The end-to-end check on a real multirun is tests/test_sweep.py::test_multirun_of_the_default_indexes_and_compares;
compare's W&B reader is checked on a real (offline) W&B run in tests/test_tracking.py. Here the run directories are
real frozen configs (compose + freeze) with metrics.json / trainer_state.json in the formats run_training writes.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from sft_exp.config import to_run_config
from sft_exp.config.frozen import freeze
from sft_exp.tools.compare import collect, main, table, write_report
from tests.conftest import PY, REPO, compose


def make_run(root: Path, name: str, overrides: list[str], eval_all: float | None, steps: int = 4) -> Path:
    run_dir = root / name
    freeze(to_run_config(compose(overrides)), run_dir, overrides)
    if eval_all is None:  # an unfinished run: no metrics.json, no trainer_state.json
        return run_dir
    sources = {"arith": eval_all - 0.1, "tools": eval_all + 0.1}
    history = [{"loss": 8.0 - 0.5 * s, "step": s} for s in range(1, steps + 1)]
    history += [{"eval_arith_loss": sources["arith"] + 0.2, "eval_tools_loss": sources["tools"] + 0.2, "step": 2}]
    (run_dir / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    metrics = {
        "eval_loss_before": {"arith": 8.3, "tools": 8.4, "all": 8.35},
        "eval_loss_after": {**sources, "all": eval_all},
        "train_loss_last": {"all": 8.0 - 0.5 * steps},
        "global_steps": steps,
        "train_tokens_per_second": 2000.0,
        "wall_seconds": 12.5,
        "eval_trained_tokens": {"arith": 100, "tools": 100},
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    return run_dir


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    make_run(root, "a", ["train.learning_rate=1e-3", "packing=ffd"], 7.9)
    make_run(root, "b", ["train.learning_rate=3e-3", "packing=ffd"], 7.5)
    make_run(root, "c", ["train.learning_rate=1e-3", "packing=bfd"], 7.7)
    make_run(root, "d", ["train.learning_rate=3e-3", "packing=bfd"], None)
    return root


def test_loose_run_dirs_are_diffed_into_swept_keys_and_the_best_is_marked(runs: Path, tmp_path: Path) -> None:
    recs, keys, _ = collect([runs])
    assert keys == ["packing.strategy", "train.learning_rate"]
    by = {Path(r.path).name: r for r in recs}
    assert by["b"].swept == {"packing.strategy": "ffd", "train.learning_rate": 0.003}
    assert by["d"].status == "unfinished" and by["a"].status == "finished"
    # eval "all" at an intermediate step is rebuilt with the eval sets' token weights
    assert by["a"].eval_curves["all"] == [(0.0, 8.35), (2.0, pytest.approx(8.1)), (4.0, 7.9)]
    header, rows = table(recs, keys, "all")
    best = [r for r in rows if r[-1] == "*"]
    assert len(best) == 1 and best[0][0] == by["b"].name
    header, rows = table(recs, keys, "arith")
    assert [r[0] for r in rows if r[-1] == "*"] == [by["b"].name]

    written = write_report(recs, keys, "all", "test", tmp_path / "out")
    assert set(written) == {
        "csv",
        "md",
        "loss_curves",
        "final_eval_vs_packing.strategy",
        "final_eval_vs_train.learning_rate",
    }
    rows = list(csv.DictReader(open(written["csv"])))
    assert [r["status"] for r in rows] == ["finished", "finished", "finished", "unfinished"]
    assert rows[1]["best"] == "*" and rows[3]["eval_all"] == ""
    md = written["md"].read_text()
    assert "Best: **" in md and "![loss_curves](loss_curves.png)" in md and "| - |" in md
    for p in written.values():
        assert p.stat().st_size > 0


def test_cli_writes_into_the_out_dir_and_rejects_bad_input(runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    assert main([str(runs / "a"), str(runs / "b"), "--out", str(out), "--no-plots"]) == 0
    assert (out / "compare.csv").exists() and not (out / "loss_curves.png").exists()
    r = subprocess.run(
        [PY, "-m", "sft_exp.tools.compare", str(tmp_path / "nope")], capture_output=True, text=True, cwd=REPO
    )
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = subprocess.run(
        [PY, "-m", "sft_exp.tools.compare", str(runs), "--objective", "nope"], capture_output=True, text=True, cwd=REPO
    )
    assert r.returncode == 2 and "neither 'all' nor a source (arith, tools)" in r.stderr
    r = subprocess.run([PY, "-m", "sft_exp.tools.compare"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "--wandb" in r.stderr
