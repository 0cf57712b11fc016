"""Bad input: a clear, short error (what, where, how to fix), a non-zero exit, no traceback, nothing finished-looking.

One parametrised test over every case, each a real `python launch.py ...` process.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sft_exp.config import ASSETS
from tests.conftest import launch

pytestmark = pytest.mark.slow

NO_MARKERS = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
ALL_ZERO = [f"mixture.sources.{n}.weight=0" for n in ("arith", "count", "reverse", "sort", "tools", "units")]

# case -> (overrides, what the `error:` line must contain: the key it names and the gist). Every case: exit 2, one
# `error:` line on stderr, no traceback, and no run directory left behind (nothing of a finished one touched).
CASES = {
    # composition: Hydra's own errors, translated (sft_exp.config.compose_errors)
    "unknown key": (["model.foo=1"], "model.foo: Key 'foo' not in 'ModelConfig'"),
    "unknown key added with +": (["+train.lerning_rate=1e-3"], "train.lerning_rate: not a key of the train config"),
    "unknown source key added with +": (["+mixture.sources.arith.wieght=2"], "Did you mean weight"),
    "unknown top-level key": (["+typo=3"], "typo: not a key of the run config"),
    "wrong type": (["train.max_steps=abc"], "train.max_steps: Value 'abc' of type 'str' could not be converted"),
    "invalid choice": (["packing=best"], "packing: In 'config': Could not find 'packing/best'"),
    "unknown group": (["nosuchgroup=x"], "nosuchgroup: Key 'nosuchgroup' not in 'RunConfig'"),
    "override syntax": (["mixture.sources.arith.weight=[1"], "Check the override's syntax"),
    "scheduler typo": (["train.lr_scheduler_type=cosin"], "train.lr_scheduler_type: Invalid value 'cosin'"),
    "save strategy typo": (["train.save_strategy=sometimes"], "train.save_strategy: Invalid value 'sometimes'"),
    "eval strategy typo": (["train.eval_strategy=always"], "train.eval_strategy: Invalid value 'always'"),
    "dtype typo": (["model.dtype=float8"], "model.dtype: Invalid value 'float8'"),
    "attention that would cross packed sequences": (
        ["model.attn_implementation=paged_attention"],
        "model.attn_implementation: Invalid value 'paged_attention', expected one of [sdpa, eager",
    ),
    # validation: the schema's cross-field and range checks
    "negative weight": (["mixture.sources.arith.weight=-1"], "mixture.sources.arith.weight: must be a number >= 0"),
    "nan weight": (["mixture.sources.arith.weight=nan"], "mixture.sources.arith.weight: must be a number >= 0"),
    "all weights zero": (ALL_ZERO, "every weight is 0"),
    "missing local file": (["mixture.sources.arith.path=/nope/x.jsonl"], "'/nope/x.jsonl' does not exist"),
    "zero accumulation": (["train.gradient_accumulation_steps=0"], "train.gradient_accumulation_steps: must be"),
    "zero batch": (["train.per_device_train_batch_size=0"], "train.per_device_train_batch_size: must be"),
    "negative learning rate": (["train.learning_rate=-1"], "train.learning_rate: must be a number > 0"),
    "warmup over 1": (["train.warmup_ratio=1.5"], "train.warmup_ratio: must be a share of the steps in [0, 1)"),
    "zero max_steps": (["train.max_steps=0"], "train.max_steps: must be -1"),
    "zero epochs": (["train.max_steps=-1", "train.num_train_epochs=0"], "train.num_train_epochs: must be"),
    "negative eval steps": (["train.eval_strategy=steps", "train.eval_steps=-5"], "train.eval_steps: must be > 0"),
    "zero logging steps": (["train.logging_steps=0"], "train.logging_steps: must be > 0"),
    "proportion without a budget": (["mixture.weighting=proportion"], "mixture.weighting: 'proportion' shares"),
    "objective that is no source": (["sweep.objective=nope"], "sweep.objective: 'nope'"),
    "eval without held-out rows": (
        ["train.eval_strategy=steps", "train.eval_steps=5", "mixture.test_split_size=0"],
        "nothing to evaluate on",
    ),
    "fsdp1, which cannot run on CPU ranks": (
        ["distributed=fsdp", "distributed.fsdp.version=1"],
        "distributed.fsdp.version: is 1: sft-exp runs FSDP2 only",
    ),
    "activations checkpointed twice under fsdp": (
        ["distributed=fsdp", "distributed.fsdp.activation_checkpointing=true", "train.gradient_checkpointing=true"],
        "are both true: activations would be checkpointed twice",
    ),
    "generation scorer unknown": (
        ["eval.generate.enabled=true", "mixture.sources.arith.scorer=nope"],
        "mixture.sources.arith.scorer",
    ),
    # eval.harness: checked before the run directory exists (the task names by lm-eval's own index)
    "harness task that does not exist": (["eval.harness.tasks=[sftexp_cuont]"], "(close: sftexp_count"),
    "harness include path that does not exist": (
        ["eval.harness.tasks=[sftexp_demo]", "eval.harness.include_path=[/nope/tasks]"],
        "eval.harness.include_path[0]: '/nope/tasks' is not a folder",
    ),
    "harness task whose data is missing": (
        ["eval.harness.tasks=[gone]", "eval.harness.include_path=@GONE_TASK"],
        "eval.harness.tasks[0]: lm-eval cannot load 'gone'",
    ),
    "harness objective without harness tasks": (
        ["sweep.objective=harness/sftexp_count/exact_match"],
        "sweep.objective: 'harness/sftexp_count/exact_match' is a harness score but eval.harness.tasks is empty",
    ),
    "harness argument lm-eval does not take": (
        ["eval.harness.tasks=[sftexp_demo]", "+eval.harness.extra.bootstrap=5"],
        "eval.harness.extra.bootstrap: is not an argument of lm_eval.simple_evaluate",
    ),
    # the machine: devices, kernels, packages (sft_exp.config.preflight)
    "more processes than devices": (
        ["distributed=ddp", "distributed.processes_per_node=64"],
        "distributed.processes_per_node: 64 processes on this node but it has",
    ),
    "attention kernel that cannot run here": (
        ["model.attn_implementation=flash_attention_2"],
        "model.attn_implementation: flash_attention_2 cannot run",
    ),
    "liger where it cannot run": (["train.use_liger_kernel=true"], "train.use_liger_kernel: "),
    "nccl without GPUs": (["distributed=ddp", "distributed.backend=nccl"], "distributed.backend: nccl needs CUDA"),
    # what transformers / TRL refuse, found by building the SFTConfig once, dry
    "optimizer transformers does not know": (["+train.extra.optim=adamw_nope"], "train.extra.optim: transformers"),
    "extra field that is not in SFTConfig": (["+train.extra.not_a_field=1"], "train.extra.not_a_field: is not a field"),
    "extra field sft-exp sets itself": (["+train.extra.max_length=8"], "train.extra.max_length: is set by sft-exp"),
    # model and tokenizer loading (before anything is written)
    "model folder that does not exist": (["model.name_or_path=/nope/model"], "model.name_or_path: '/nope/model'"),
    "hub id not cached while offline": (["model.name_or_path=nobody/no-model"], "HF_HUB_OFFLINE is set"),
    "model folder with a broken config": (["model.name_or_path=@BROKEN"], "config or tokenizer files cannot be read"),
    # data and templates (found while preparing: the run directory it made is removed)
    "unknown hub dataset": (
        ["mixture.sources.arith.path=null", "mixture.sources.arith.id=nobody/no-such-dataset"],
        "mixture.sources.arith: could not load nobody/no-such-dataset",
    ),
    "unknown split of local files": (["mixture.sources.arith.split=validation"], "split: 'validation' for local files"),
    "data that is not valid UTF-8": (["mixture.sources.arith.path=@LATIN1"], "line 4 is not valid UTF-8"),
    "a column the data lacks": (["mixture.sources.arith.columns=[messages,nope]"], "columns ['nope'] not found"),
    "template without generation markers": (["template.chat_template=@NO_MARKERS"], "no {% generation %} markers"),
    "eos token the tokenizer lacks": (["template.eos_token=nope_token"], "template.eos_token: 'nope_token' is not a"),
    "max_length too small for the header": (["packing.max_length=100"], "too small for the template's header"),
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
    overrides = [_materialise(o, tmp_path) for o in overrides]
    r = launch([*args, *overrides], cwd=tmp_path, timeout=300)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert len(errors) == 1 and needle in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    if case == "run dir holds a finished run":
        assert (run_dir / "metrics.json").read_text() == '{"done": true}\n'  # untouched
        assert not (run_dir / ".hydra").exists()  # refused before Hydra wrote anything there
    else:
        assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())  # nothing left behind


def _materialise(override: str, tmp_path: Path) -> str:
    """`key=@NAME`: a file the case needs, written into tmp_path."""
    key, _, value = override.partition("=")
    if value == "@GONE_TASK":  # an offline-style task whose jsonl is not there
        (tmp_path / "tasks").mkdir()
        (tmp_path / "tasks" / "gone.yaml").write_text(
            "task: gone\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {tmp_path / 'nowhere.jsonl'}\ntest_split: test\noutput_type: loglikelihood\n"
            "doc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        )
        return f"{key}=[{tmp_path / 'tasks'}]"
    if value == "@NO_MARKERS":
        (tmp_path / "plain.jinja").write_text(NO_MARKERS)
        return f"{key}={tmp_path / 'plain.jinja'}"
    if value == "@BROKEN":
        (tmp_path / "model").mkdir()
        (tmp_path / "model" / "config.json").write_text("{not json")
        return f"{key}={tmp_path / 'model'}"
    if value == "@LATIN1":
        rows = (ASSETS / "demo" / "arith.jsonl").read_bytes().splitlines(keepends=True)[:3]
        (tmp_path / "latin1.jsonl").write_bytes(b"".join(rows) + '{"messages": "café"}\n'.encode("latin-1"))
        return f"{key}={tmp_path / 'latin1.jsonl'}"
    return override
