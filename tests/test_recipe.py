"""experiment=smollm3_sft reproduces the SmolLM3 SFT recipe field for field (facts: shared/reference)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from sft_exp.config import DistStrategy, to_run_config, validate
from tests.conftest import REPO, compose

REFERENCE = REPO.parent / "shared" / "reference" / "smollm3_sft_recipe.md"


@pytest.fixture(scope="module")
def run():
    r = to_run_config(compose(["experiment=smollm3_sft"]))
    validate(r)
    return r


def _recipe_table() -> dict[str, float]:
    if not REFERENCE.exists():
        pytest.skip(f"{REFERENCE} not found (CI has ../shared beside the clone)")
    rows = re.findall(r"^\| \d+ \| (\S+) \| ([\d.]+) \|$", Path(REFERENCE).read_text(), flags=re.M)
    assert len(rows) == 25
    return {split: float(w) for split, w in rows}


def test_model(run) -> None:
    assert run.model.name_or_path == "HuggingFaceTB/SmolLM3-3B-checkpoints"
    assert run.model.revision == "it-mid-training"
    assert run.model.dtype.value == "bfloat16" and run.model.attn_implementation.value == "flash_attention_2"
    assert run.model.init.value == "pretrained"


def test_mixture_has_every_split_with_its_weight(run) -> None:
    table = _recipe_table()
    m = run.mixture
    assert {n: s.weight for n, s in m.sources.items()} == table
    for name, s in m.sources.items():
        assert (s.id, s.config, s.split, s.columns) == (
            "HuggingFaceTB/smoltalk2",
            "SFT",
            name,
            ["messages", "chat_template_kwargs"],
        )
    assert m.seed == 0 and m.weighting.value == "fraction" and m.num_proc == 12


def test_template_and_packing(run) -> None:
    assert run.template.chat_template.endswith("smollm3.jinja") and run.template.enable_thinking
    assert run.template.eos_token == "<|im_end|>"
    assert run.packing.enabled and run.packing.strategy.value == "ffd" and run.packing.max_length == 65536


def test_launch_shape_and_tracking(run) -> None:
    d = run.distributed
    assert (d.strategy.value, d.nodes, d.processes_per_node, d.timeout_minutes) == ("zero3", 8, 8, 300)
    z = d.deepspeed["zero_optimization"]
    assert z["stage"] == 3 and z["stage3_gather_16bit_weights_on_model_save"] is True
    assert z["offload_optimizer"]["device"] == "none" and z["offload_param"]["device"] == "none"
    assert run.tracking.backend.value == "wandb"


def test_every_trainer_value(run) -> None:
    from sft_exp.train.sft_config import build_sft_config

    # Built as a single process would (DeepSpeed on this GPU-less machine cannot take bf16); the launch shape is
    # checked in test_launch_shape_and_tracking.
    single = copy.deepcopy(run)
    single.distributed.strategy = DistStrategy.single
    single.distributed.nodes = single.distributed.processes_per_node = 1
    args = build_sft_config(single, "/tmp/smollm3-sft")
    expected = {
        "learning_rate": 2e-5,
        "num_train_epochs": 5,
        "max_steps": -1,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 2,
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": True},
        "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
        "max_grad_norm": 0.2,
        "max_length": 65536,
        "seed": 42,
        "use_liger_kernel": True,
        "warmup_steps": 0.03,  # transformers 5 reads a float < 1 as the warmup ratio
        "average_tokens_across_devices": True,
        "logging_steps": 1,
        "ddp_timeout": 18000,
        "bf16": True,
        "do_eval": False,
        "run_name": "smollm3-sft-training",
    }
    for key, value in expected.items():
        assert getattr(args, key) == value, key
    assert args.lr_scheduler_type.value == "cosine_with_min_lr"
    assert args.save_strategy.value == "epoch" and args.eval_strategy.value == "no"
    # assistant-only loss and ffd packing are ours (data stage), so TRL's own switches stay off on purpose
    assert run.train.assistant_only_loss and not args.packing
    assert run.train.save_total_limit == 1  # rotated by sft_exp.checkpoints (complete checkpoints only), not TRL
