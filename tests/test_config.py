"""Every group choice and every experiment preset composes and validates; bad keys, types, choices fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sft_exp.config import ConfigError, RunConfig, to_run_config, validate
from tests.conftest import CONF, compose, launch

# Every config group (experiments are tested below; conf/hydra holds Hydra's own settings, not a choice).
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("experiment", "hydra"))


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


# Choices that are values of a key rather than files of a group (every new one is listed here).
KEY_CHOICES = [
    *[f"template.train_on={v}" for v in ("content", "content_and_header", "template")],
    *[f"mixture.sources.arith.format={v}" for v in ("auto", "messages", "sharegpt", "alpaca", "prompt_completion")],
    "+mixture.sources.arith.fields.messages=chat",
    "+mixture.sources.arith.roles.bot=assistant",
]


@pytest.mark.parametrize("override", KEY_CHOICES)
def test_every_key_choice_composes_and_validates(override: str) -> None:
    run = to_run_config(compose([override]))
    validate(run)
    key, value = override.lstrip("+").split("=")
    node = run
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    assert getattr(node, "value", node) == value


def test_every_harness_key_composes_and_validates(tmp_path: Path) -> None:
    """eval.harness.* (sft_exp/eval/harness.py): every key set from the command line, as the README names them."""
    overrides = {
        "tasks": ("[sftexp_demo,sftexp_count]", ["sftexp_demo", "sftexp_count"]),
        "include_path": (f"[{tmp_path}]", [str(tmp_path)]),
        "limit": ("0.5", 0.5),
        "num_fewshot": ("2", 2),
        "batch_size": ("4", 4),
        "apply_chat_template": ("false", False),
        "enable_thinking": ("false", False),
        "think_end_token": ("null", None),
        "samples": ("0", 0),
        "check_data": ("false", False),
    }
    extra = ["+eval.harness.gen_kwargs.max_gen_toks=64", "+eval.harness.extra.bootstrap_iters=0"]
    run = to_run_config(compose([*(f"eval.harness.{k}={v}" for k, (v, _) in overrides.items()), *extra]))
    validate(run)
    h = run.eval.harness
    assert {k: getattr(h, k) for k in overrides} == {k: want for k, (_, want) in overrides.items()}
    assert h.gen_kwargs == {"max_gen_toks": 64} and h.extra == {"bootstrap_iters": 0}


def test_every_yaml_opens_with_its_command() -> None:
    for path in CONF.rglob("*.yaml"):
        lines = path.read_text().splitlines()
        first = lines[1] if lines[0].startswith("# @package") else lines[0]  # Hydra wants its header first
        assert first.startswith("# ") and "python launch.py" in first, path


def test_default_is_the_tiny_demo() -> None:
    run = to_run_config(compose())
    assert run.model.init.value == "random" and run.model.name_or_path.endswith("tiny_smollm3")
    assert len(run.mixture.sources) >= 5
    assert run.packing.strategy.value == "ffd" and run.train.assistant_only_loss and not run.train.bf16
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
        ("packing.strategy=best", "expected one of [ffd, bfd, wrapped, none]"),
        ("packing.strategy=bfd_split", "expected one of [ffd, bfd, wrapped, none]"),  # the preset packing=bfd_split
        ("packing.enabled=false", "Key 'enabled' not in 'PackingConfig'"),  # packing off is packing=none
        ("launcher.kind=slurm", "Key 'kind' not in 'LauncherConfig'"),  # launcher=slurm
        ("train.lr_scheduler_type=cosine_min", "Invalid value 'cosine_min', expected one of [linear, cosine,"),
        ("train.save_strategy=epochs", "Invalid value 'epochs', expected one of [no, steps, epoch, best]"),
        ("train.eval_strategy=step", "Invalid value 'step', expected one of [no, steps, epoch]"),
    ],
)
def test_bad_override_fails_at_composition(override: str, needle: str) -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as e:
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
    hydra_cfg = OmegaConf.load(Path(CONF) / "hydra" / "default.yaml")
    assert OmegaConf.to_container(hydra_cfg)["run"]["dir"].startswith("${claim_dir:")


# ------------------------------------------------------------------------------------ conf/ written as differences
def test_trainer_enums_match_transformers() -> None:
    """schema.py copies transformers' enums (so composition needs no transformers import): they must still match."""
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType

    from sft_exp.config import schema

    for ours, theirs in [
        (schema.SchedulerType, SchedulerType),
        (schema.IntervalStrategy, IntervalStrategy),
        (schema.SaveStrategy, SaveStrategy),
    ]:
        assert [e.value for e in ours] == [e.value for e in theirs], ours.__name__


def test_zero3_offload_is_zero3_plus_offload() -> None:
    base = to_run_config(compose(["distributed=zero3"])).distributed.deepspeed
    off = to_run_config(compose(["distributed=zero3_offload"])).distributed.deepspeed
    assert off["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert off["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert off["optimizer"]["type"] == "AdamW"
    for key in ("offload_param", "offload_optimizer"):
        base["zero_optimization"].pop(key), off["zero_optimization"].pop(key)
    off.pop("optimizer")
    assert off == base


def test_bfd_split_is_a_preset_of_bfd_and_overflow_split() -> None:
    p = to_run_config(compose(["packing=bfd_split"])).packing
    assert (p.strategy.value, p.overflow.value, p.max_length) == ("bfd", "split", 1024)
    # an explicit overflow is no longer silently ignored
    p = to_run_config(compose(["packing=bfd_split", "packing.overflow=truncate"])).packing
    assert (p.strategy.value, p.overflow.value) == ("bfd", "truncate")


def test_source_defaults_fill_what_a_source_leaves_unset() -> None:
    m = to_run_config(compose(["mixture=smoltalk2_sft"])).mixture
    assert len(m.sources) == 25
    for name, s in m.sources.items():
        assert (s.id, s.config, s.split.replace(".", "_"), s.columns) == (
            "HuggingFaceTB/smoltalk2",
            "SFT",
            name,
            ["messages", "chat_template_kwargs"],
        )
    own = "mixture.sources.table_gpt_Qwen3_32B_think.config=other"  # a source's own value wins over the default
    run = to_run_config(compose(["mixture=smoltalk2_sft", own, "mixture.source_defaults.id=x/y"]))
    sources = run.mixture.sources
    assert sources["table_gpt_Qwen3_32B_think"].config == "other" and sources["table_gpt_no_think"].config == "SFT"
    assert sources["table_gpt_no_think"].id == "x/y"
    # local sources (path) take no hub fields from the defaults
    run = to_run_config(compose(["mixture.source_defaults.id=x/y", "mixture.source_defaults.columns=[messages]"]))
    assert run.mixture.sources["arith"].id is None and run.mixture.sources["arith"].columns == ["messages"]
    validate(run)


def test_older_frozen_configs_still_load(tmp_path: Path) -> None:
    """run_config.yaml frozen before packing.enabled, strategy bfd_split and launcher.kind went (resume, requeue)."""
    from sft_exp.config.frozen import load_frozen

    for packing, want in [
        ({"enabled": False, "strategy": "ffd"}, ("none", "truncate")),
        ({"enabled": True, "strategy": "bfd_split", "overflow": "split"}, ("bfd", "split")),
    ]:
        frozen = OmegaConf.to_container(OmegaConf.structured(to_run_config(compose())), enum_to_str=True)
        frozen["packing"].update(packing)
        frozen["launcher"]["kind"] = "local"
        OmegaConf.save(frozen, tmp_path / "run_config.yaml")
        p = load_frozen(tmp_path).packing
        assert (p.strategy.value, p.overflow.value) == want


def test_outputs_and_cache_come_from_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sft_exp.config.frozen import cache_dir

    monkeypatch.chdir(tmp_path)
    assert cache_dir(to_run_config(compose())) == tmp_path / "outputs" / "cache"
    assert to_run_config(compose(["paths.output_dir=/scratch/x"])).cache_dir == "/scratch/x/cache"
    assert to_run_config(compose(["cache_dir=rel/c"])).cache_dir == str(tmp_path / "rel" / "c")
    monkeypatch.setenv("SFT_EXP_OUTPUT_DIR", "/scratch/env")
    cfg = compose(return_hydra_config=True)
    assert cfg.hydra.sweep.dir.startswith("/scratch/env/sweeps/") and cfg.cache_dir == "/scratch/env/cache"


def test_keys_that_do_not_change_training_agree_everywhere() -> None:
    """resume (MAY_DIFFER), compare (not swept) and Hydra's exclude_keys (sweep run directory names) name the same
    top-level keys as not changing what is trained."""
    from omegaconf import OmegaConf

    from sft_exp.config.naming import NOT_EXPERIMENT
    from sft_exp.launch.resume import MAY_DIFFER
    from sft_exp.tools.compare import NOT_EXPERIMENT_KEY

    hydra_cfg = OmegaConf.load(CONF / "hydra" / "default.yaml")
    excluded = {k.split(".")[0] for k in hydra_cfg.job.config.override_dirname.exclude_keys}
    assert set(MAY_DIFFER) == set(NOT_EXPERIMENT)
    assert set(NOT_EXPERIMENT) - {"inspect", "experiment"} <= excluded  # both are spelled out by their own keys
    assert all(NOT_EXPERIMENT_KEY.match(f"{k}.x") and NOT_EXPERIMENT_KEY.match(k) for k in NOT_EXPERIMENT)
    assert not NOT_EXPERIMENT_KEY.match("train.learning_rate") and not NOT_EXPERIMENT_KEY.match("tracking_x")
