"""experiment=smollm3_sft reproduces the SmolLM3 SFT recipe field for field (facts: tests/data/smollm3_sft_recipe.md,
vendored from the shared reference so these tests run, and can fail, in a fresh clone)."""

from __future__ import annotations

import ast
import copy
import re
from enum import Enum
from pathlib import Path

import pytest

from sft_exp.config import DistStrategy, to_run_config, validate
from tests.conftest import compose

REFERENCE = Path(__file__).parent / "data" / "smollm3_sft_recipe.md"


@pytest.fixture(scope="module")
def run():
    r = to_run_config(compose(["experiment=smollm3_sft"]))
    validate(r)
    return r


def _recipe_table() -> dict[str, float]:
    rows = re.findall(r"^\| \d+ \| (\S+) \| ([\d.]+) \|$", REFERENCE.read_text(), flags=re.M)
    assert len(rows) == 25
    return {split: float(w) for split, w in rows}


def _recipe_trainer() -> dict[str, object]:
    """The reference's "## Trainer" list: `- key: <Python literal>` lines (the prose `launch` line is not one)."""
    section = REFERENCE.read_text().split("## Trainer", 1)[1].split("\n## ", 1)[0]
    out = {}
    for key, text in re.findall(r"^- (\w+): (.+)$", section, flags=re.M):
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            assert key == "launch", key
    assert len(out) >= 25
    return out


def test_model(run) -> None:
    assert run.model.name_or_path == "HuggingFaceTB/SmolLM3-3B-checkpoints"
    assert run.model.revision == "it-mid-training"
    assert run.model.dtype.value == "bfloat16" and run.model.attn_implementation.value == "flash_attention_2"
    assert run.model.init.value == "pretrained"


def test_mixture_has_every_split_with_its_weight(run) -> None:
    table = _recipe_table()
    m = run.mixture
    # source names are the split names with '.' as '_' (a dot cannot be part of an override key)
    assert {s.split: s.weight for s in m.sources.values()} == table
    for name, s in m.sources.items():
        assert (s.id, s.config, name, s.columns) == (
            "HuggingFaceTB/smoltalk2",
            "SFT",
            s.split.replace(".", "_"),
            ["messages", "chat_template_kwargs"],
        )
    assert m.seed == 0 and m.weighting.value == "fraction" and m.num_proc == 12


def test_template_and_packing(run) -> None:
    assert run.template.chat_template.endswith("smollm3_recipe.jinja") and run.template.enable_thinking
    assert run.template.train_on.value == "template"  # the recipe's mask: exactly what the markers wrap (TRL's)
    assert run.template.eos_token == "<|im_end|>"
    assert run.packing.strategy.value == "ffd" and run.packing.max_length == 65536


def test_launch_shape_and_tracking(run) -> None:
    d = run.distributed
    assert (d.strategy.value, d.nodes, d.processes_per_node, d.timeout_minutes) == ("zero3", 8, 8, 300)
    z = d.deepspeed["zero_optimization"]
    assert z["stage"] == 3 and z["stage3_gather_16bit_weights_on_model_save"] is True
    assert z["offload_optimizer"]["device"] == "none" and z["offload_param"]["device"] == "none"
    assert run.tracking.backend.value == "wandb"


# Reference keys that sft-exp holds somewhere other than the same-named SFTConfig field, each with why.
ELSEWHERE = {
    "dataset_num_proc": lambda run, args: run.mixture.num_proc,
    "eos_token": lambda run, args: run.template.eos_token,
    # assistant-only loss and ffd packing are ours (data stage), so TRL's own switches stay off on purpose
    "assistant_only_loss": lambda run, args: run.train.assistant_only_loss and not args.assistant_only_loss,
    "packing": lambda run, args: run.packing.strategy.value != "none" and not args.packing,
    "packing_strategy": lambda run, args: run.packing.strategy.value,
    "warmup_ratio": lambda run, args: args.warmup_steps,  # transformers 5 reads a float < 1 as the warmup ratio
    "save_total_limit": lambda run, args: run.train.save_total_limit,  # rotated by sft_exp (complete checkpoints)
    "report_to": lambda run, args: [run.tracking.backend.value],  # our tracker, not the Trainer's report_to
}
DIFFERENT_ON_PURPOSE = {"output_dir"}  # runs land in outputs/runs/smollm3-sft/<time> (README, the experiment file)


def test_every_trainer_value(run) -> None:
    """Every `key: value` of the reference's trainer list against the SFTConfig sft-exp builds (or where it is held)."""
    from sft_exp.train.sft_config import build_sft_config

    # Built as a single process would (DeepSpeed on this GPU-less machine cannot take bf16); the launch shape is
    # checked in test_launch_shape_and_tracking.
    single = copy.deepcopy(run)
    single.distributed.strategy = DistStrategy.single
    single.distributed.nodes = single.distributed.processes_per_node = 1
    args = build_sft_config(single, "/tmp/smollm3-sft")
    for key, value in _recipe_trainer().items():
        if key in DIFFERENT_ON_PURPOSE:
            continue
        got = ELSEWHERE[key](run, args) if key in ELSEWHERE else getattr(args, key)
        assert (got.value if isinstance(got, Enum) else got) == value, key


def test_every_source_of_the_recipe_can_be_overridden_on_the_command_line() -> None:
    names = list(to_run_config(compose(["experiment=smollm3_sft"])).mixture.sources)
    run = to_run_config(compose(["experiment=smollm3_sft", *[f"mixture.sources.{n}.weight=0.25" for n in names]]))
    assert list(run.mixture.sources) == names and {s.weight for s in run.mixture.sources.values()} == {0.25}
