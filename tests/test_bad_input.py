"""Bad input: a clear, short error (what, where, how to fix), a non-zero exit, no traceback, nothing finished-looking.

One parametrised test over every case, each a real `python launch.py ...` process.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import launch

pytestmark = pytest.mark.slow

NO_MARKERS = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
ALL_ZERO = [f"mixture.sources.{n}.weight=0" for n in ("arith", "count", "reverse", "sort", "tools", "units")]

CASES = {
    "unknown key": (["model.foo=1"], "Key 'foo' not in 'ModelConfig'"),
    "wrong type": (["train.max_steps=abc"], "Value 'abc' of type 'str' could not be converted to Integer"),
    "invalid choice": (["packing=best"], "Could not find 'packing/best'"),
    "negative weight": (["mixture.sources.arith.weight=-1"], "mixture.sources.arith.weight: must be a number >= 0"),
    "nan weight": (["mixture.sources.arith.weight=nan"], "mixture.sources.arith.weight: must be a number >= 0"),
    "all weights zero": (ALL_ZERO, "every weight is 0"),
    "missing local file": (["mixture.sources.arith.path=/nope/x.jsonl"], "'/nope/x.jsonl' does not exist"),
    "unknown hub dataset": (
        ["mixture.sources.arith.path=null", "mixture.sources.arith.id=nobody/no-such-dataset"],
        "mixture.sources.arith: could not load nobody/no-such-dataset",
    ),
    "unknown split of local files": (["mixture.sources.arith.split=validation"], "split: 'validation' for local files"),
    "columns differ": (["mixture.sources.arith.columns=[messages]"], "columns differ across sources"),
    "template without generation markers": (["template.chat_template=@NO_MARKERS"], "no {% generation %} markers"),
    "max_length too small for the header": (["packing.max_length=100"], "too small for the template's header"),
    "eval without held-out rows": (
        ["train.eval_strategy=steps", "train.eval_steps=5", "mixture.test_split_size=0"],
        "nothing to evaluate on",
    ),
    "more processes than devices": (
        ["distributed=ddp", "distributed.processes_per_node=64"],
        "distributed.processes_per_node: 64 processes on this node but it has",
    ),
    "fsdp1, which cannot run on CPU ranks": (
        ["distributed=fsdp", "distributed.fsdp.version=1"],
        "distributed.fsdp.version: is 1: sft-exp runs FSDP2 only",
    ),
    "activations checkpointed twice under fsdp": (
        ["distributed=fsdp", "distributed.fsdp.activation_checkpointing=true", "train.gradient_checkpointing=true"],
        "are both true: activations would be checkpointed twice",
    ),
    "attention that would cross packed sequences": (
        ["model.attn_implementation=paged_attention"],
        "expected one of [sdpa, eager, flex_attention, flash_attention_2",
    ),
    "attention kernel that cannot run here": (
        ["model.attn_implementation=flash_attention_2"],
        "model.attn_implementation: flash_attention_2 cannot run",
    ),
    "liger where it cannot run": (["train.use_liger_kernel=true"], "train.use_liger_kernel: "),
    "run dir holds a finished run": (["@FINISHED"], "already holds a finished run"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_clearly_and_early(case: str, tmp_path: Path, fast_args: list[str]) -> None:
    overrides, needle = CASES[case]
    args = [a for a in fast_args if not a.startswith("packing.max_length")] + ["train.max_steps=1"]
    run_dir = tmp_path / "run"
    if overrides == ["@FINISHED"]:
        run_dir.mkdir()
        (run_dir / "run_config.yaml").write_text("mode: train\n")
        (run_dir / "metrics.json").write_text('{"done": true}\n')
        overrides = []
    if overrides == ["template.chat_template=@NO_MARKERS"]:
        tpl = tmp_path / "plain.jinja"
        tpl.write_text(NO_MARKERS)
        overrides = [f"template.chat_template={tpl}"]
    r = launch([*args, *overrides], cwd=tmp_path, timeout=300)
    assert r.returncode != 0, r.stdout[-2000:]
    assert needle in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    if case == "run dir holds a finished run":
        assert (run_dir / "metrics.json").read_text() == '{"done": true}\n'  # untouched
        assert not (run_dir / ".hydra").exists()  # refused before Hydra wrote anything there
    else:
        assert not (run_dir / "metrics.json").exists()
