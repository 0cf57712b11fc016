"""Every group choice and every experiment preset composes and validates; bad keys, types, choices fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sft_exp.config import ConfigError, RunConfig, to_run_config, validate
from tests.conftest import CONF, compose, launch

GROUPS = ["model", "template", "mixture", "packing", "distributed", "launcher", "train", "tracking", "sweep", "peft"]


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,choice", [(g, c) for g in GROUPS for c in choices(g)])
def test_every_group_choice_composes_and_validates(group: str, choice: str) -> None:
    run = to_run_config(compose([f"{group}={choice}"]))
    assert isinstance(run, RunConfig)
    if (group, choice) == ("peft", "qlora") and not _cuda():
        # GPU only: refused in validate() on a machine without CUDA (tests/test_peft.py checks the whole message)
        with pytest.raises(ConfigError, match="needs a CUDA GPU"):
            validate(run)
        return
    validate(run)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("preset", choices("experiment"))
def test_every_experiment_preset_composes_and_validates(preset: str) -> None:
    run = to_run_config(compose([f"experiment={preset}"]))
    validate(run)


def test_every_yaml_opens_with_its_command() -> None:
    for path in CONF.rglob("*.yaml"):
        lines = path.read_text().splitlines()
        first = lines[1] if lines[0].startswith("# @package") else lines[0]  # Hydra wants its header first
        assert first.startswith("# ") and "python launch.py" in first, path


def test_default_is_the_tiny_demo() -> None:
    run = to_run_config(compose())
    assert run.model.init.value == "random" and run.model.name_or_path.endswith("tiny_smollm3")
    assert len(run.mixture.sources) >= 5
    assert run.packing.enabled and run.train.assistant_only_loss and not run.train.bf16
    assert not run.model.trust_remote_code


def test_source_weight_override() -> None:
    run = to_run_config(compose(["mixture.sources.arith.weight=0.5"]))
    assert run.mixture.sources["arith"].weight == 0.5


@pytest.mark.parametrize(
    "override,needle",
    [
        ("model.foo=1", "Key 'foo' not in 'ModelConfig'"),
        ("train.max_steps=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
        ("model.dtype=fp8", "Invalid value 'fp8', expected one of [float32, bfloat16, float16]"),
        ("packing.strategy=best", "expected one of [ffd, bfd, bfd_split, wrapped, none]"),
    ],
)
def test_bad_override_fails_at_composition(override: str, needle: str) -> None:
    with pytest.raises(Exception) as e:
        compose([override])
    assert needle in str(e.value) or needle in str(e.value.__cause__)


def test_invalid_group_choice_lists_the_valid_ones(tmp_path) -> None:
    r = launch(["model=nope"], cwd=tmp_path, timeout=60)
    assert r.returncode != 0
    assert "Could not find 'model/nope'" in r.stderr and "tiny" in r.stderr


@pytest.mark.parametrize(
    "override,needle",
    [
        ("mixture.sources.arith.weight=-1", "mixture.sources.arith.weight: must be a number >= 0"),
        ("mixture.sources.arith.weight=nan", "mixture.sources.arith.weight: must be a number >= 0"),
        ("mixture.sources.arith.path=/nope.jsonl", "mixture.sources.arith.path: '/nope.jsonl' does not exist"),
        ("train.eval_strategy=steps", "nothing to evaluate on"),
        ("distributed.processes_per_node=2", "'single' runs one process"),
    ],
)
def test_validate_rejects(override: str, needle: str) -> None:
    overrides = [override]
    if "eval_strategy" in override:
        overrides.append("mixture.test_split_size=0")
    run = to_run_config(compose(overrides))
    with pytest.raises(ConfigError, match=".*") as e:
        validate(run)
    assert needle in str(e.value)


def test_all_weights_zero_is_an_error() -> None:
    run = to_run_config(compose())
    for s in run.mixture.sources.values():
        s.weight = 0.0
    with pytest.raises(ConfigError, match="every weight is 0"):
        validate(run)


def test_train_extra_is_checked_against_sftconfig() -> None:
    from sft_exp.train.sft_config import build_sft_config

    run = to_run_config(compose(["+train.extra.not_a_field=1"]))
    with pytest.raises(ConfigError, match="train.extra.not_a_field: is not a field of trl.SFTConfig"):
        build_sft_config(run, "/tmp/x")
    run = to_run_config(compose(["+train.extra.optim=adafactor"]))
    assert build_sft_config(run, "/tmp/x").optim.value == "adafactor"


def test_frozen_config_round_trips(tmp_path) -> None:
    from sft_exp.config.frozen import freeze, load_frozen

    run = to_run_config(compose(["mixture.sources.sort.weight=2", "train.learning_rate=1e-4"]))
    freeze(run, tmp_path, ["x=y"])
    again = load_frozen(tmp_path)
    assert again == run
    assert "${" not in (tmp_path / "run_config.yaml").read_text()  # resolved: workers never need Hydra
    assert OmegaConf.load(tmp_path / "run_config.yaml").mixture.sources.sort.weight == 2


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path: Path) -> None:
    """The default hydra.run.dir is ${claim_dir:<date>/<time>}: created atomically, numbered when taken."""
    import multiprocessing as mp

    from sft_exp.config.naming import claim_dir

    base = str(tmp_path / "runs" / "10-00-00")
    with mp.get_context("spawn").Pool(2, maxtasksperchild=1) as pool:  # one process per claim, as two runs are
        dirs = [r.get(60) for r in [pool.apply_async(claim_dir, (base,)) for _ in range(2)]]
    assert sorted(dirs) == [base, base + "-1"] and all(Path(d).is_dir() for d in dirs)
    other = str(tmp_path / "runs" / "10-00-01")
    assert claim_dir(other) == claim_dir(other) == other  # Hydra resolves it several times: one answer
    compose_cfg = OmegaConf.load(Path(CONF) / "config.yaml")
    assert OmegaConf.to_container(compose_cfg)["hydra"]["run"]["dir"].startswith("${claim_dir:")
