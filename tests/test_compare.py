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
    """A run directory as a real run leaves it: the frozen config (compose + freeze), and when finished
    trainer_state.json, metrics.json and mixture_stats.json in the formats run_training / the data stage write (the
    keys of a real `launch.py` run's files, the fast_args run); eval_all=None: an unfinished run (no metrics.json)."""
    run_dir = root / name
    run = to_run_config(compose(overrides))
    freeze(run, run_dir, overrides)
    (run_dir / "attempts.json").write_text(json.dumps([ATTEMPT]))
    if eval_all is None:  # an unfinished run: no metrics.json, no trainer_state.json
        return run_dir
    names = sorted(run.mixture.sources)
    offset = {n: 0.1 * (i - 1) for i, n in enumerate(names)}  # arith -0.1, count 0, ...
    sources = {n: eval_all + offset[n] for n in names}
    history = [{"loss": 8.0 - 0.5 * s, "step": s} for s in range(1, steps + 1)]
    history += [{**{f"eval_{n}_loss": v + 0.2 for n, v in sources.items()}, "step": 2}]
    (run_dir / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    metrics = {
        "train_loss_first": {**{n: 8.3 for n in names}, "all": 8.3},
        "train_loss_last": {**{n: 8.0 - 0.5 * steps for n in names}, "all": 8.0 - 0.5 * steps},
        "eval_loss_before": {**{n: 8.3 + offset[n] for n in names}, "all": 8.3},
        "eval_loss_after": {**sources, "all": eval_all},
        "train_loss_mean": 7.8,
        "global_steps": steps,
        "train_runtime_seconds": 10.0,
        "train_tokens_seen": 5827,
        "train_tokens_per_second": 2000.0,
        "trained_tokens": 100 * len(names),
        "trained_tokens_per_source": {n: 100 for n in names},
        "packing_efficiency": 0.93,
        "resumed_from": None,
        "world_size": 1,
        "eval_trained_tokens": {n: 100 for n in names},
        "trainable_parameters": 1508480,
        "total_parameters": 1508480,
        "wall_seconds": 12.5,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    stats = {
        "mixture": {"weighting": "fraction", "total_rows": None, "total_tokens": None, "seed": 0},
        "sources": {n: {"rows": 1592, "weight": 1.0, "tokens": 347550, "trained_tokens": 74613} for n in names},
        "total": {"rows": 1592 * len(names), "tokens": 347550 * len(names), "trained_tokens": 74613 * len(names)},
        "packing": {"strategy": run.packing.strategy.value, "max_length": run.packing.max_length},
    }
    (run_dir / "mixture_stats.json").write_text(json.dumps(stats))
    return run_dir


ATTEMPT = {"started": "2026-12-05T19:37:01+0000", "host": "node7", "pid": 6136, "slurm_job_id": None,
           "slurm_restart_count": 0, "world_size": 1, "resumed_from": None}  # fmt: skip


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    make_run(root, "a", ["train.learning_rate=1e-3", "packing=ffd"], 7.9)
    make_run(root, "b", ["train.learning_rate=3e-3", "packing=ffd"], 7.5)
    make_run(root, "c", ["train.learning_rate=1e-3", "packing=bfd"], 7.7)
    make_run(root, "d", ["train.learning_rate=3e-3", "packing=bfd"], None)
    return root


def test_loose_run_dirs_are_diffed_into_swept_keys_and_the_best_is_marked(runs: Path, tmp_path: Path) -> None:
    notes: list[str] = []
    recs, keys, _ = collect([runs], notes)
    assert keys == ["packing.strategy", "train.learning_rate"]
    by = {Path(r.path).name: r for r in recs}
    assert by["b"].swept == {"packing.strategy": "ffd", "train.learning_rate": 0.003}
    assert "d" not in by and all(r.status == "finished" for r in recs)  # the unfinished run is skipped, and said so
    assert len(notes) == 1 and notes[0].startswith(f"skipped {runs / 'd'}: unfinished") and "node7" in notes[0]
    # eval "all" at an intermediate step is rebuilt with the eval sets' token weights
    assert by["a"].eval_curves["all"] == [(0.0, 8.3), (2.0, pytest.approx(8.25)), (4.0, 7.9)]
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
    assert [r["status"] for r in rows] == ["finished", "finished", "finished"]
    assert rows[1]["best"] == "*"
    md = written["md"].read_text()
    assert "Best: **" in md and "![loss_curves](loss_curves.png)" in md
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
    assert r.returncode == 2 and "neither 'all' nor a source (arith, count, reverse, sort, tools, units)" in r.stderr
    r = subprocess.run([PY, "-m", "sft_exp.tools.compare"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "--wandb" in r.stderr


def test_unfinished_and_failed_runs_are_skipped_with_the_reason(runs: Path, tmp_path: Path) -> None:
    make_run(runs, "e", ["train.learning_rate=2e-3"], None)
    (runs / "e" / "checkpoint-2").mkdir()
    make_run(runs, "f", ["train.learning_rate=5e-3"], None)
    (runs / "f" / "logs").mkdir()
    error = {"message": {"message": "DataError: tools: rows.jsonl line 3: not UTF-8\nmore", "extraInfo": {}}}
    (runs / "f" / "logs" / "rank0.error.json").write_text(json.dumps(error))
    make_run(runs, "g", ["train.learning_rate=6e-3"], None)
    (runs / "g" / "train.log").write_text("step 1\nerror: model.name_or_path: no such folder. Give a local path\n")
    notes: list[str] = []
    recs, keys, _ = collect([runs], notes)
    assert sorted(Path(r.path).name for r in recs) == ["a", "b", "c"]
    why = {Path(line.split(":")[0].removeprefix("skipped ")).name: line for line in notes}
    assert set(why) == {"d", "e", "f", "g"}
    assert "unfinished" in why["e"] and "checkpoint-2" in why["e"] and "resume=" in why["e"]
    assert "failed: DataError: tools: rows.jsonl line 3: not UTF-8 (logs/rank0.error.json)" in why["f"]
    assert "failed: error: model.name_or_path: no such folder" in why["g"] and "(train.log)" in why["g"]
    # on the command line: a `note:` line per skipped run, and the table of the finished ones
    out = tmp_path / "cmp"
    r = subprocess.run([PY, "-m", "sft_exp.tools.compare", str(runs), "--out", str(out), "--no-plots"],
                       capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert sum(line.startswith("note: skipped ") for line in r.stdout.splitlines()) == 4
    assert "skipped" in (out / "compare.md").read_text()
    # nothing finished: an error that still says why each was skipped
    r = subprocess.run([PY, "-m", "sft_exp.tools.compare", str(runs / "f"), str(runs / "g")],
                       capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert r.returncode == 2 and "error: no finished runs found" in r.stderr and r.stderr.count("note: skipped") == 2


def test_different_source_sets_show_the_union_with_blanks(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    make_run(root, "all6", ["train.learning_rate=1e-3"], 7.9)
    make_run(root, "no_tools", ["train.learning_rate=1e-3", "~mixture.sources.tools"], 7.5)
    notes: list[str] = []
    recs, keys, _ = collect([root], notes)
    assert keys == ["mixture.sources"]  # one column naming the sources, not every field of the missing one
    by = {Path(r.path).name: r for r in recs}
    assert by["no_tools"].swept["mixture.sources"] == "arith,count,reverse,sort,units"
    header, rows = table(recs, keys, "all")
    row = dict(zip(header, rows[[r.path for r in recs].index(by["no_tools"].path)]))
    assert row["eval_tools"] == "" and row["eval_arith"] == pytest.approx(7.4)
    assert any(n.startswith("source tools is not in 1 run(s)") for n in notes)
    assert any("different source sets" in n for n in notes)
    written = write_report(recs, keys, "all", "t", tmp_path / "out", plots=False, notes=notes)
    csv_rows = list(csv.DictReader(open(written["csv"])))
    assert float(csv_rows[0]["eval_tools"]) == pytest.approx(8.2) and csv_rows[1]["eval_tools"] == ""
    assert "- source tools is not in 1 run(s)" in written["md"].read_text()


def test_keys_that_do_not_change_training_are_not_swept(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    make_run(root, "a", ["train.learning_rate=1e-3"], 7.9)
    make_run(root, "b", ["train.learning_rate=3e-3", "train.logging_steps=1", "train.save_strategy=steps",
                         "train.save_steps=2", "train.save_total_limit=1", "train.eval_strategy=steps",
                         "train.eval_steps=2", "train.dataloader_num_workers=2", "+train.extra.logging_first_step=true",
                         "eval.generate.every_steps=0", "tracking=none"], 7.5)  # fmt: skip
    recs, keys, _ = collect([root])
    assert keys == ["train.learning_rate"]
    assert sorted(r.label for r in recs) == ["lr=0.001", "lr=0.003"]


def test_labels_stay_distinct(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    make_run(root, "x", ["train.learning_rate=1e-4"], 7.9)
    make_run(root, "y", ["train.learning_rate=1.0000001e-4"], 7.8)  # prints as 0.0001 too
    make_run(root, "z", ["train.learning_rate=3e-4"], 7.7)
    recs, keys, _ = collect([root])
    assert keys == ["train.learning_rate"]
    assert sorted(r.label for r in recs) == ["lr=0.0001 [x]", "lr=0.0001 [y]", "lr=0.0003"]
    header, rows = table(recs, keys, "all")
    assert len({r[0] for r in rows}) == 3
    # the same directory name under two parents, the same config: the parent tells them apart
    make_run(tmp_path / "p1", "run", [], 7.9)
    make_run(tmp_path / "p2", "run", [], 7.8)
    recs, keys, _ = collect([tmp_path / "p1" / "run", tmp_path / "p2" / "run"])
    assert keys == [] and sorted(r.label for r in recs) == ["run [p1/run]", "run [p2/run]"]
