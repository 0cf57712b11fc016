"""eval.harness (sft_exp/eval/harness.py) and the objectives (sft_exp/eval/objective.py): lm-eval's results read
into metrics, the shipped demo tasks and a user's offline YAML + jsonl task on the tiny model, and whole runs (a
sweep optimising a harness score, indexed and compared; evaluate --harness; a task failing after training)."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest

from sft_exp.config import HarnessConfig, to_run_config
from sft_exp.eval import objective
from sft_exp.eval.harness import _think_end, check_tasks, evaluate, summarise
from tests.conftest import PY, REPO, compose, launch

# lm-eval's simple_evaluate result, the parts sft-exp reads (shape as lm-eval 0.4.x writes it)
LM_EVAL_RESULTS = {
    "results": {
        "sftexp_arith_mc": {"alias": "sftexp_arith_mc", "acc,none": 0.375, "acc_stderr,none": 0.18,
                            "acc_norm,none": 0.25, "acc_norm_stderr,none": 0.16},
        "sftexp_count": {"alias": "sftexp_count", "exact_match,last_number": 0.5,
                         "exact_match_stderr,last_number": 0.2},
        "wikitext": {"alias": "wikitext", "word_perplexity,none": 31.5, "bits_per_byte,none": 0.9},
    },
    "higher_is_better": {
        "sftexp_arith_mc": {"acc": True, "acc_norm": True},
        "sftexp_count": {"exact_match": True},
        "wikitext": {"word_perplexity": False, "bits_per_byte": False},
    },
}  # fmt: skip


def test_lm_eval_results_become_a_metrics_block_with_directions() -> None:
    block, better = summarise(LM_EVAL_RESULTS)
    assert block == {
        "sftexp_arith_mc": {"acc": 0.375, "acc_norm": 0.25},  # the `none` filter drops out of the name
        "sftexp_count": {"exact_match_last_number": 0.5},  # another filter stays in it
        "wikitext": {"word_perplexity": 31.5, "bits_per_byte": 0.9},
    }
    assert better["wikitext"] == {"word_perplexity": False, "bits_per_byte": False}
    assert better["sftexp_count"] == {"exact_match_last_number": True}


def test_objectives_read_losses_generation_metrics_and_harness_scores_in_their_direction() -> None:
    block, better = summarise(LM_EVAL_RESULTS)
    final = {
        "eval_loss_after": {"all": 2.5, "arith": 2.0},
        "eval_generate": {"all": {"stops": 0.75, "role_leak": 0.1}},
        "eval_harness": block,
        "eval_harness_higher_is_better": better,
    }
    cases = {  # objective: (kind, value, direction, what a minimising sweeper gets)
        "all": ("loss", 2.5, "minimize", 2.5),
        "arith": ("loss", 2.0, "minimize", 2.0),
        "gen/all/stops": ("gen", 0.75, "maximize", -0.75),
        "gen/all/role_leak": ("gen", 0.1, "minimize", 0.1),
        "harness/sftexp_arith_mc/acc": ("harness", 0.375, "maximize", -0.375),
        "harness/wikitext/word_perplexity": ("harness", 31.5, "minimize", 31.5),
    }
    for obj, (kind, value, direction, minimised) in cases.items():
        assert objective.kind(obj) == kind
        assert objective.value(final, obj) == value
        assert objective.direction(obj, final) == direction
        assert objective.to_minimise(final, obj) == minimised
    assert objective.value(final, "harness/nope/acc") is None and objective.value(final, "harness/bad") is None
    assert objective.direction("harness/x/bits_per_byte") == "minimize"  # no recorded direction: by its name
    assert objective.best([("a", 0.2), ("b", 0.5)], "harness/sftexp_arith_mc/acc", final) == "b"
    assert objective.best([("a", 0.2), ("b", 0.5)], "all") == "a"


# ------------------------------------------------------------------------------------------ real lm-eval, tiny model
def _tiny(run):  # noqa: ANN001, ANN202
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sft_exp.train.model import align_with_tokenizer, build_tokenizer

    tok = build_tokenizer(run)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(run.model.name_or_path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    return tok, align_with_tokenizer(model, tok).eval()


def _offline_task(folder: Path, name: str = "my_mc", data: Path | None = None) -> Path:
    """A task the way offline clusters define one: a YAML with dataset_path json and an absolute data_files path."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"q": "Which is a colour?", "choices": ["red", "seven", "quickly"], "label": 0},
        {"q": "Which is a number?", "choices": ["blue", "seven", "table"], "label": 1},
        {"q": "Which is an animal?", "choices": ["chair", "green", "horse"], "label": 2},
    ]
    data = data or folder / f"{name}.jsonl"
    if not data.exists() and data.parent.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{name}.yaml").write_text(
        textwrap.dedent(f"""\
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{q}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: label
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        metadata:
          version: 1.0
        """)
    )
    return folder


def test_shipped_and_offline_tasks_score_the_model_through_its_chat_template(tmp_path: Path) -> None:
    """Real lm-eval on the tiny model: the shipped demo tag (a generation task and a log-likelihood one) and a
    user's YAML + jsonl task; acc is what the per-choice log-likelihoods say; prompts went through the template."""
    run = to_run_config(compose(["model.init=random"]))
    tok, model = _tiny(run)
    h = HarnessConfig(tasks=["sftexp_demo", "my_mc"], include_path=[str(_offline_task(tmp_path / "tasks"))], limit=4)
    h.gen_kwargs = {"max_gen_toks": 8}
    res = evaluate(model, tok, h, check_tasks(h))
    block = res["eval_harness"]
    assert set(block) >= {"sftexp_count", "sftexp_arith_mc", "my_mc"}
    assert set(block["sftexp_count"]) == {"exact_match_last_number"} and set(block["my_mc"]) == {"acc"}
    assert res["n_samples"]["my_mc"]["effective"] == 3 and res["n_samples"]["sftexp_count"]["effective"] == 4
    assert res["higher_is_better"]["my_mc"] == {"acc": True}
    # acc from the log-likelihoods lm-eval computed with this model: argmax over choices == label
    rows = [json.loads(line) for line in (tmp_path / "tasks" / "my_mc.jsonl").read_text().splitlines()]
    picked = [max(range(len(s["filtered"])), key=lambda i: s["filtered"][i][0]) for s in res["samples"]["my_mc"]]
    assert block["my_mc"]["acc"] == pytest.approx(sum(p == r["label"] for p, r in zip(picked, rows)) / 3)
    assert all(s["scores"]["acc"] in (0.0, 1.0) for s in res["samples"]["my_mc"])
    assert all(s["prompt"].rstrip().endswith("<|im_start|>assistant") for s in res["samples"]["sftexp_count"])
    assert len(res["samples"]["sftexp_arith_mc"]) == 3  # eval.harness.samples


def test_the_end_of_thinking_marker_goes_to_lm_eval_as_its_token_id() -> None:
    tok, _ = _tiny(to_run_config(compose(["model.init=random"])))
    assert _think_end(tok, "</think>") == tok.convert_tokens_to_ids("</think>")
    assert _think_end(tok, "Final answer:") == "Final answer:" and _think_end(tok, None) is None


# ------------------------------------------------------------------------------------------------------ whole runs
@pytest.mark.slow
def test_a_sweep_on_a_harness_score_indexes_compares_and_reevaluates(tmp_path: Path, shared_cache: Path) -> None:
    """Two runs optimising harness/my_mc/acc: scores in each metrics.json, eval_harness.json, the sweep index and
    compare (columns, the best run in the score's direction, a plot); evaluate --harness on a finished run."""
    tasks = _offline_task(tmp_path / "tasks")
    sweep = tmp_path / "sweep"
    r = launch(["-m", f"hydra.sweep.dir={sweep}", f"cache_dir={shared_cache}", "train.max_steps=2",
                "mixture.test_split_size=4", "packing.max_length=256", "eval_before_train=false",
                "train.learning_rate=1e-3,3e-3", "eval.harness.tasks=[sftexp_arith_mc,my_mc]",
                f"eval.harness.include_path=[{tasks}]", "eval.harness.limit=4",
                "sweep.objective=harness/my_mc/acc"], tmp_path, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "lm-eval scores after training" in r.stdout
    index = json.loads((sweep / "sweep_index.json").read_text())
    runs = {k: e["final"] for k, e in index["runs"].items()}
    assert len(runs) == 2
    for key, final in runs.items():
        m = json.loads((sweep / key / "metrics.json").read_text())
        assert m["eval_harness"] == final["eval_harness"] and m["eval_harness_error"] is None
        assert set(m["eval_harness"]) == {"sftexp_arith_mc", "my_mc"}
        assert final["objective"] == m["eval_harness"]["my_mc"]["acc"]
        saved = json.loads((sweep / key / "eval_harness.json").read_text())
        assert saved["eval_harness"] == m["eval_harness"] and saved["settings"]["limit"] == 4
    cmp = subprocess.run([PY, "-m", "sft_exp.tools.compare", str(sweep), "--objective", "harness/my_mc/acc"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert cmp.returncode == 0, cmp.stderr[-2000:]
    header = next(line for line in cmp.stdout.splitlines() if line.lstrip().startswith("run"))
    assert "my_mc.acc" in header and "sftexp_arith_mc.acc_norm" in header
    best = max(runs.values(), key=lambda f: f["eval_harness"]["my_mc"]["acc"])
    md = (sweep / "compare.md").read_text()
    assert "lm-eval score `harness/my_mc/acc` after training (maximized)" in md
    assert f"harness/my_mc/acc {best['eval_harness']['my_mc']['acc']:.4f}" in md
    assert list(sweep.glob("final_harness_vs_*.png"))

    run_dir = sweep / next(iter(runs))
    ev = subprocess.run([PY, "-m", "sft_exp.evaluate", str(run_dir), "--harness", "sftexp_count", "--limit", "2"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert ev.returncode == 0, ev.stderr[-2000:]
    again = [p for p in run_dir.glob("eval_harness-*.json")]  # the run's own results are not overwritten
    assert len(again) == 1 and json.loads(again[0].read_text())["n_samples"]["sftexp_count"]["effective"] == 2
    assert json.loads((run_dir / "eval_harness.json").read_text())["tasks"] == ["sftexp_arith_mc", "my_mc"]


@pytest.mark.slow
def test_a_task_that_fails_after_training_keeps_the_run(tmp_path: Path, fast_args: list[str]) -> None:
    """The task's data file is missing (with check_data=false found only after training): the model and
    metrics.json stay, metrics.json names the failure, and the run exits 2 saying how to evaluate again. Then
    `evaluate --base` rebuilds the model the run started from: its generation metrics are the run's own
    before-training ones."""
    tasks = _offline_task(tmp_path / "tasks", "gone", data=tmp_path / "nowhere" / "gone.jsonl")
    r = launch([*fast_args, "train.max_steps=1", "eval.harness.tasks=[gone]", f"eval.harness.include_path=[{tasks}]",
                "eval.harness.check_data=false",  # else found before training (tests/test_bad_input.py)
                "eval.generate.enabled=true", "eval.generate.rows=2", "eval.generate.max_new_tokens=8"],
               tmp_path, timeout=600)  # fmt: skip
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    run_dir = tmp_path / "run"
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["eval_harness"] is None and m["eval_harness_error"].startswith("eval.harness: lm-eval on ['gone'] failed")
    assert (run_dir / "model.safetensors").exists() and m["global_steps"] == 1
    error = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert error and "kept in" in error[-1] and f"python -m sft_exp.evaluate {run_dir} --harness gone" in error[-1]
    assert "Traceback" not in r.stderr

    ev = subprocess.run([PY, "-m", "sft_exp.evaluate", str(run_dir), "--base"], cwd=tmp_path, capture_output=True,
                        text=True, timeout=300)  # fmt: skip
    assert ev.returncode == 0, ev.stderr[-2000:]
    from sft_exp.eval.generate import metrics_block

    base = json.loads((run_dir / "eval_generate_base.json").read_text())
    assert "starting model" in base["model"] and metrics_block(base) == m["eval_generate_before"]
