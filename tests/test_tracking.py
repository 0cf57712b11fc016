"""Tracking: W&B (offline, read back with W&B's own CLI) and TensorBoard on real runs; secrets never leave the env."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from sft_exp.config import ConfigError, to_run_config, validate
from sft_exp.train.tracking import final_summary, flatten, rename
from tests.conftest import PY, compose, launch

FAKE = {"WANDB_API_KEY": "fakewandbkey0123456789abcdef0123456789abcd", "HF_TOKEN": "hf_FakeTokenForTheLeakTest42"}


# ------------------------------------------------------------------------------------------------------ unit
def test_flatten_rename_and_summary_keys() -> None:
    flat = flatten({"mixture": {"sources": {"arith": {"weight": 0.5}}, "seed": 0}, "extra": {}, "tags": ["a"]})
    assert flat == {"mixture.sources.arith.weight": 0.5, "mixture.seed": 0, "extra": {}, "tags": ["a"]}
    logs = {"loss": 2.0, "loss_arith": 1.5, "eval_arith_loss": 1.2, "eval_arith_runtime": 0.1, "note": "x"}
    assert rename(logs) == {"train/loss": 2.0, "train/loss_arith": 1.5, "eval/arith_loss": 1.2}
    s = final_summary({"eval_loss_after": {"arith": 1.0, "all": 1.1}, "train_tokens_per_second": 10.0})
    assert s == {"final/eval_loss/arith": 1.0, "final/eval_loss/all": 1.1, "final/tokens_per_second": 10.0}


def test_training_flops_count_weights_and_the_causal_attention_of_each_packed_sequence() -> None:
    import torch

    from sft_exp.train.collator import PackedCollator, attention_pairs
    from sft_exp.train.model import count_parameters
    from sft_exp.train.tracking import train_flops

    # two packed rows of sequences 3+2 and 4 tokens, padding-free: one flat row, positions restart per sequence
    rows = [
        {"input_ids": [1] * 5, "loss_mask": [1] * 5, "seq_lengths": [3, 2], "seq_sources": [0, 1]},
        {"input_ids": [1] * 4, "loss_mask": [1] * 4, "seq_lengths": [4], "seq_sources": [0]},
    ]
    want = 3 * 4 + 2 * 3 + 4 * 5
    assert attention_pairs(PackedCollator(0)(rows)) == want
    padded = PackedCollator(0, padding_free=False)(
        [rows[1], {**rows[1], "input_ids": [1, 1], "seq_lengths": [2], "loss_mask": [1, 1]}]
    )
    assert attention_pairs(padded) == 4 * 5 + 2 * 3  # the real lengths, not the padded width
    # 6 N per token + 6 L d_attn sum s(s+1): e.g. N=10, 9 tokens, L=2, d=8
    assert train_flops(10, 2, 8, 9, want) == 6 * 10 * 9 + 6 * 2 * 8 * want
    lin = torch.nn.Linear(3, 2)
    lin.weight.ds_numel = 6  # a ZeRO-3 partitioned parameter: numel() 0 on this rank, its size in ds_numel
    lin.weight.data = torch.empty(0)
    assert count_parameters(lin)[1] == 6 + 2  # what MFU counts (it used p.numel(): 0 under ZeRO-3)


def test_report_to_wandb_is_refused_in_favour_of_the_tracking_group() -> None:
    with pytest.raises(ConfigError, match=r"train.report_to: asks transformers for \['wandb'\].*tracking=wandb"):
        validate(to_run_config(compose(["train.report_to=[wandb]"])))


def test_online_wandb_needs_a_key_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(ConfigError, match="tracking.mode: is online but no W&B key is set"):
        validate(to_run_config(compose(["tracking=wandb", "tracking.mode=online"])))
    validate(to_run_config(compose(["tracking=wandb", "tracking.mode=offline"])))
    monkeypatch.setenv("WANDB_API_KEY", FAKE["WANDB_API_KEY"])
    validate(to_run_config(compose(["tracking=wandb", "tracking.mode=online"])))


@pytest.mark.parametrize(
    "override", ["+train.extra.hub_token=hf_FakeTokenForTheLeakTest42", "tracking.notes=${oc.env:HF_TOKEN}"]
)
def test_a_secret_in_the_config_is_refused_without_printing_it(override: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", FAKE["HF_TOKEN"])
    with pytest.raises(ConfigError) as e:
        validate(to_run_config(compose(["tracking=wandb", override])))
    assert "holds the value of $HF_TOKEN" in str(e.value) and FAKE["HF_TOKEN"] not in str(e.value)


# ------------------------------------------------------------------------------------------------------ e2e
def small(fast_args: list[str], steps: int) -> list[str]:
    """fast_args with 2 held-out rows per source (the per-source evals are most of a tiny run's time)."""
    args = [a for a in fast_args if not a.startswith(("train.max_steps=", "mixture.test_split_size="))]
    return [*args, "mixture.test_split_size=2", f"train.max_steps={steps}", "train.logging_steps=1"]


def wandb_cli(*args: str) -> str:
    out = subprocess.run(
        [str(Path(PY).parent / "wandb"), "leet", "inspect", *args], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def assert_no_secret_anywhere(root: Path, *texts: str) -> None:
    """Every file the run wrote (configs, logs, W&B's files and debug logs) and its console output."""
    checked = 0
    for p in root.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            checked += 1
            for name, value in FAKE.items():
                assert value.encode() not in data, f"{name} leaked into {p}"
    for t in texts:
        for name, value in FAKE.items():
            assert value not in t, f"{name} leaked into the console output"
    assert checked > 20


@pytest.mark.slow
def test_wandb_offline_run_logs_config_metrics_mixture_and_no_secret(tmp_path: Path, fast_args: list[str]) -> None:
    from sft_exp.tools.compare import run_from_wandb

    args = [*small(fast_args, 3), "tracking=wandb", "tracking.mode=offline"]
    args += ["tracking.project=sft-test", "tracking.tags=[smoke,ci]"]
    args += ["eval.harness.tasks=[sftexp_arith_mc]", "eval.harness.limit=2"]  # lm-eval scores reach W&B too
    r = launch(args, cwd=tmp_path, env=FAKE)
    assert r.returncode == 0, r.stderr[-4000:]
    run_dir = tmp_path / "run"
    (wb,) = offline_runs(run_dir)
    s = json.loads(wandb_cli("--summary", "--json", str(wb)))
    assert s["state"] == "finished" and s["project"] == "sft-test" and s["tags"] == ["smoke", "ci"]
    assert s["run_id"] == json.loads((run_dir / "tracking.json").read_text())["wandb_id"]
    assert "train.max_steps=3" in s["name"]  # a single run is named after its overrides
    cfg = s["config"]
    # the whole resolved config, flattened: every mixture weight is its own key, no nested dicts
    assert not any(isinstance(v, dict) and v for v in cfg.values())
    sources = json.loads((run_dir / "mixture_stats.json").read_text())["sources"]
    for name in sources:
        assert cfg[f"mixture.sources.{name}.weight"] == 1.0 and 0 < cfg[f"mixture.share.{name}"] < 1
    assert sum(cfg[f"mixture.share.{n}"] for n in sources) == pytest.approx(1, abs=1e-4)
    assert cfg["train.learning_rate"] > 0 and cfg["tracking.mode"] == "offline" and cfg["train.max_steps"] == 3
    # per-source eval loss, tokens/s, packing efficiency, the mixture table
    metrics = json.loads((run_dir / "metrics.json").read_text())
    summ = s["summary"]
    for name in [*sources, "all"]:
        assert summ[f"final/eval_loss/{name}"] == pytest.approx(metrics["eval_loss_after"][name])
    for name in sources:
        assert summ[f"eval/{name}_loss"] == pytest.approx(metrics["eval_loss_after"][name], rel=1e-5)
    assert summ["train/tokens_per_second"] > 0 and summ["final/tokens_per_second"] > 0
    assert 0 < summ["packing/efficiency"] <= 1
    assert summ["mixture"]["_type"] == "table-file" and summ["mixture"]["nrows"] == len(sources)

    records = [json.loads(line) for line in wandb_cli("--json", str(wb)).splitlines()]
    run_rec = next(x["run"] for x in records if x["type"] == "run")
    assert run_rec["job_type"] == "train" and not run_rec.get("run_group")  # a single run has no sweep group
    history = [x["history"]["item"] for x in records if x["type"] == "history"]
    assert any(h.get("eval/arith_loss") and h["train/global_step"] == 0 for h in history)  # before training
    assert any(h.get("train/loss_arith") for h in history) or any(h.get("train/loss_count") for h in history)
    # compare's W&B reader, fed with what W&B recorded, gives back the run's numbers
    rec = run_from_wandb(s["name"], str(wb), s["state"], cfg, summ, history)
    assert rec.eval_after("all") == pytest.approx(metrics["eval_loss_after"]["all"])
    assert rec.eval_curves["all"][0] == (0.0, pytest.approx(metrics["eval_loss_before"]["all"]))
    assert [step for step, _ in rec.train_curve] == [1.0, 2.0, 3.0]
    acc = metrics["eval_harness"]["sftexp_arith_mc"]["acc"]
    assert summ["final/harness/sftexp_arith_mc/acc"] == pytest.approx(acc)
    assert any(h.get("harness/sftexp_arith_mc/acc") == pytest.approx(acc) for h in history)
    assert rec.objective("harness/sftexp_arith_mc/acc") == pytest.approx(acc)

    assert_no_secret_anywhere(tmp_path, r.stdout, r.stderr)


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_wandb_run(tmp_path: Path, fast_args: list[str]) -> None:
    """resume=<run dir> (as after a crash or a requeue) logs into the same W&B run id instead of a new run."""
    args = [*small(fast_args, 2), "mode=prepare", "tracking=wandb", "tracking.mode=offline"]
    r1 = launch(args, cwd=tmp_path, env=FAKE)
    assert r1.returncode == 0, r1.stderr[-3000:]
    run_dir = tmp_path / "run"
    first = json.loads((run_dir / "tracking.json").read_text())["wandb_id"]
    r2 = launch([*args, f"resume={run_dir}"], cwd=tmp_path, env=FAKE)
    assert r2.returncode == 0, r2.stderr[-3000:]
    runs = offline_runs(run_dir)
    assert len(runs) == 2 and all(p.name.endswith(f"-{first}") for p in runs)
    s = json.loads(wandb_cli("--summary", "--json", str(runs[-1])))
    assert s["run_id"] == first and s["state"] == "finished"
    assert_no_secret_anywhere(tmp_path, r1.stdout, r1.stderr, r2.stdout, r2.stderr)


@pytest.mark.slow
def test_tensorboard_run_writes_scalars_config_and_mixture(tmp_path: Path, fast_args: list[str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # A made-up peak of 1 GFLOP/s so that this CPU run logs an MFU (on a GPU the card's datasheet peak is used).
    r = launch([*small(fast_args, 2), "tracking=tensorboard", "tracking.peak_tflops=0.001"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    ea = EventAccumulator(str(tmp_path / "run/tensorboard"))
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/tokens_per_second", "train/mfu", "eval/arith_loss", "packing/efficiency"} <= scalars
    # MFU counts the attention of the packed sequences on top of 6 N per token: above the weights-only figure
    n_params = json.loads((tmp_path / "run/metrics.json").read_text())["total_parameters"]
    for tps, mfu in zip(ea.Scalars("train/tokens_per_second"), ea.Scalars("train/mfu")):
        weights_only = 6 * n_params * tps.value / 1e9
        assert weights_only < mfu.value < 1.5 * weights_only, (tps.value, mfu.value, weights_only)
    assert [e.step for e in ea.Scalars("eval/arith_loss")] == [0, 2]
    assert [e.step for e in ea.Scalars("train/loss")] == [1, 2]
    texts = {t for t in ea.Tags().get("tensors", [])}
    assert any(t.startswith("config") for t in texts) and any(t.startswith("mixture") for t in texts)
    assert any((tmp_path / "run/tensorboard").rglob("events.out.tfevents.*"))


def test_tracking_none_adds_no_tracker_files(tmp_path: Path) -> None:
    from sft_exp.train import tracking

    t = tracking.start(to_run_config(compose()), tmp_path, None)
    assert t.backend == "none" and not any(tmp_path.iterdir())
    assert os.environ.get("WANDB_MODE") == "offline"  # conftest: tests never go online
