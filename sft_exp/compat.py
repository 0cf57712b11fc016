"""Every use of another library's private API, in one place: each with why, and the version it was checked against.

When one of these libraries moves, this file is where it breaks (and the only one to fix). Besides the functions
below, sft_exp.train.trainer.SourceAwareSFTTrainer overrides four private Trainer hooks (transformers 5.24):
`_save_checkpoint` (a failed write becomes SaveFailed), `_prepare_for_training` (the pre-training eval runs once the
model is wrapped for training), `_run_epoch` (a resume at max_steps trains no extra step) and
`_issue_warnings_after_load` (no "missing keys" warning for the tied lm_head on resume).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def accelerate_enable_fsdp(plugin: Any) -> None:
    """Make accelerate's shared state say FSDP with `plugin`: the two writes AcceleratorState.__init__ makes when it
    accepts an FSDP plugin on a GPU, which it refuses on CPU ranks (accelerate 1.15)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


@contextmanager
def without_zero3_init() -> Iterator[None]:
    """from_pretrained without ZeRO-3's partitioned init, which stays on in a process that built a ZeRO-3 trainer
    (transformers 5.24 keeps it in integrations.deepspeed._hf_deepspeed_config_weak_ref; no public save/restore)."""
    from transformers.integrations import deepspeed as ds

    saved = ds._hf_deepspeed_config_weak_ref
    ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        ds._hf_deepspeed_config_weak_ref = saved


def submitit_timeout_signal(env: Any) -> int:
    """The signal Slurm sends before the time limit, as submitit set it up (submitit 1.5.4: JobEnvironment._usr_sig)."""
    return int(env._usr_sig())


def close_progress_bars() -> None:
    """Close every open tqdm bar, so an error line printed next is not followed by a bar's last redraw (tqdm 4.67:
    tqdm._instances; tqdm has no public registry of open bars)."""
    tqdm = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def trainer_output_dir(trainer: Any, trial: Any) -> str:
    """Where the Trainer writes checkpoint-N (transformers 5.24: Trainer._get_output_dir)."""
    return str(trainer._get_output_dir(trial=trial))


def trainer_tokens_seen(trainer: Any) -> int:
    """Input tokens the Trainer counted in this process (transformers 5.24: Trainer._total_train_tokens)."""
    return int(getattr(trainer, "_total_train_tokens", 0))


def trainer_save(trainer: Any, out: str, state_dict: dict[str, Any]) -> None:
    """Write a model folder from an explicit state dict (transformers 5.24: Trainer._save; save_model has no
    state_dict argument)."""
    trainer._save(out, state_dict=state_dict)


def trl_eval_metrics(trainer: Any) -> dict[str, Any]:
    """The eval extras TRL accumulates (entropy, token accuracy) before logging them (TRL 1.16: SFTTrainer._metrics)."""
    return trainer._metrics["eval"]


def reset_accelerate_state() -> None:
    """Forget the process state accelerate set up when a TrainingArguments was built (accelerate 1.15:
    AcceleratorState._reset_state, which the library's own tests use), so a later Trainer sets it up afresh."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
