"""End to end through `python launch.py`: the default experiment (shortened), prepare, --cfg, a local model folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import launch

pytestmark = pytest.mark.slow


def test_cfg_job_prints_the_composed_config(tmp_path: Path) -> None:
    r = launch(["--cfg", "job"], cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    for key in ("model:", "template:", "mixture:", "packing:", "distributed:", "train:", "mode: train"):
        assert key in r.stdout


def test_prepare_writes_mixture_stats(tmp_path: Path, fast_args: list[str]) -> None:
    r = launch(["mode=prepare", *fast_args], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads((tmp_path / "run/mixture_stats.json").read_text())
    assert set(stats) >= {"sources", "total", "packing"}
    assert len(stats["sources"]) >= 5
    for s in stats["sources"].values():
        assert s["rows"] > 0 and s["tokens"] > s["trained_tokens"] > 0
    p = stats["packing"]
    assert p["strategy"] == "ffd" and p["max_length"] == 512 and p["bins"] >= p["lower_bound"] > 0
    assert 0.9 < p["efficiency"] <= 1.0
    assert "resolved mixture" in r.stdout and "TOTAL" in r.stdout
    assert not (tmp_path / "run/metrics.json").exists() and not (tmp_path / "run/model.safetensors").exists()
    # a second prepare (other weights, other max_length) hits the per-source cache for every source
    more = ["mixture.sources.sort.weight=2", "packing.max_length=768", f"hydra.run.dir={tmp_path}/run2"]
    r2 = launch(["mode=prepare", *fast_args, *more], cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr[-3000:]
    stats2 = json.loads((tmp_path / "run2/mixture_stats.json").read_text())
    assert stats2["cache"]["misses"] == 0 and stats2["cache"]["hits"] == len(stats2["sources"])


def test_default_trains_end_to_end(tmp_path: Path, fast_args: list[str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = launch([*fast_args, "train.max_steps=12", "train.learning_rate=5e-3"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    run = tmp_path / "run"
    for f in (".hydra/config.yaml", ".hydra/overrides.yaml", "run_config.yaml", "run_info.json"):
        assert (run / f).exists(), f
    for f in ("mixture_stats.json", "metrics.json", "trainer_state.json", "model.safetensors", "tokenizer.json"):
        assert (run / f).exists(), f
    m = json.loads((run / "metrics.json").read_text())
    names = set(json.loads((run / "mixture_stats.json").read_text())["sources"])
    for key in ("train_loss_first", "train_loss_last", "eval_loss_before", "eval_loss_after"):
        assert set(m[key]) == names | {"all"}, key
    assert m["eval_loss_after"]["all"] < m["eval_loss_before"]["all"] - 0.5
    assert m["train_loss_last"]["all"] < m["train_loss_first"]["all"]
    assert m["trained_tokens"] > 0 and m["train_tokens_per_second"] > 0 and 0 < m["packing_efficiency"] <= 1
    assert m["wall_seconds"] > 0
    # per-source eval loss comes out of the trainer as eval_<source>_loss
    state = json.loads((run / "trainer_state.json").read_text())
    assert any(f"eval_{n}_loss" in h for h in state["log_history"] for n in names)
    # the run directory is a loadable model, chat template included
    model = AutoModelForCausalLM.from_pretrained(run)
    tok = AutoTokenizer.from_pretrained(run)
    assert model.config.model_type == "smollm3"
    assert "generation" in tok.chat_template and tok.eos_token == "<|im_end|>"


def test_local_model_folder_with_pretrained_init(tmp_path: Path, fast_args: list[str]) -> None:
    """The real-model path: from_pretrained on a local folder (a hub id goes through the same call)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from sft_exp.config import ASSETS

    folder = tmp_path / "my_model"
    config = AutoConfig.from_pretrained(ASSETS / "tiny_smollm3")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(ASSETS / "tiny_smollm3").save_pretrained(folder)
    r = launch([*fast_args, f"model.name_or_path={folder}", "model.init=pretrained", "train.max_steps=2"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (tmp_path / "run/metrics.json").exists()
