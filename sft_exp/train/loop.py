"""The training stage: SFTTrainer on the packed rows, eval before and after per source (loss, and generation with
eval.generate), final save, metrics.

Data arrives already tokenised, masked and packed (sft_exp.data.pipeline), so TRL's dataset preparation is skipped
(`skip_prepare_dataset`) and TRL's packing is off; sft_exp.train.collator turns the assistant mask into labels.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer

from sft_exp.checkpoints import save_guard
from sft_exp.compat import trainer_save, trainer_tokens_seen
from sft_exp.config import RunConfig
from sft_exp.errors import Interrupted
from sft_exp.eval.hooks import GenerationInRun
from sft_exp.io import read_json, write_json
from sft_exp.ranks import is_main_process
from sft_exp.rundir import RunDir
from sft_exp.train import peft
from sft_exp.train.callbacks.checkpoints import CompleteCheckpoints
from sft_exp.train.callbacks.stop_on_signal import StopOnSignal
from sft_exp.train.callbacks.tracking import TrackingCallback
from sft_exp.train.collator import PackedCollator
from sft_exp.train.sft_config import build_sft_config
from sft_exp.train.tracking import peak_tflops
from sft_exp.train.trainer import SourceAwareSFTTrainer, without_save_progress_bars


# ------------------------------------------------------------------------------------------------------ the stage
def _eval_losses(trainer: Any, trained_tokens: dict[str, int]) -> dict[str, float]:
    """{source: eval loss, ..., "all": trained-token-weighted mean of the per-source losses}."""
    res = trainer.evaluate()
    losses = {n: float(res[f"eval_{n}_loss"]) for n in trained_tokens if f"eval_{n}_loss" in res}
    total = sum(trained_tokens[n] for n in losses)
    if losses and total:
        losses["all"] = sum(losses[n] * trained_tokens[n] for n in losses) / total
    return {k: round(v, 6) for k, v in losses.items()}


def _eval_when_training_model_ready(trainer: Any, evaluate: Any) -> None:
    """Run the pre-training eval inside train(), on the model as wrapped for training, before the first step.

    Why not before train(): evaluating first leaves the model un-wrapped for training (accelerate marks it prepared in
    evaluation mode: DDP never wraps it and ranks train unsynchronised; DeepSpeed builds an inference engine and the
    first backward fails). So the trainer calls this from `_prepare_for_training`, once the training engine exists.
    Its log row is dropped from the training state, so trainer_state.json holds the training history only.
    """

    if not callable(getattr(Trainer, "_prepare_for_training", None)):
        raise RuntimeError(
            "eval_before_train needs transformers' Trainer._prepare_for_training, which this "
            "transformers version does not have. Use eval_before_train=false, or a transformers version "
            "compatible with constraints-cpu.txt"
        )

    def run() -> None:
        rows = len(trainer.state.log_history)
        evaluate()
        del trainer.state.log_history[rows:]

    trainer.on_training_model_ready = run


def _train_losses(history: list[dict[str, Any]], names: list[str], which: int) -> dict[str, float]:
    rows = [h for h in history if "loss" in h and "eval_loss" not in h]
    if not rows:
        return {}
    out = {}
    for n in names:
        vals = [h[f"loss_{n}"] for h in rows if f"loss_{n}" in h]
        if vals:
            out[n] = vals[which]
    out["all"] = rows[which]["loss"]
    return out


def mean_train_loss(history: list[dict[str, Any]], fallback: float) -> float:
    """Mean training loss over every step of the run, from the logged losses (each the mean of its logging window),
    so that a resumed run reports the whole run as the uninterrupted one does; the Trainer's own figure covers only
    the steps of this process (0.0 when a resume had nothing left to train)."""
    total = steps = 0.0
    prev = 0
    for h in history:
        if "loss" in h and "eval_loss" not in h and "step" in h:
            total += float(h["loss"]) * (h["step"] - prev)
            steps += h["step"] - prev
            prev = h["step"]
    return total / steps if steps > 0 else fallback


@contextlib.contextmanager
def rng_preserved() -> Iterator[None]:
    """Leave the global RNGs (python, numpy, torch CPU and CUDA) as they were: the block is RNG-neutral.

    The eval before training draws from torch's global RNG (each DataLoader iterator draws a base seed), and the
    training data order is then drawn after it. A resumed run skips that eval, so without this it would draw a
    different order than the uninterrupted run (exact resume broken whenever eval_before_train is on)."""
    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def save_final_model(trainer: Any, out: str) -> None:
    """The trained model as one from_pretrained folder. Under FSDP with sharded checkpoints (state_dict_type
    SHARDED_STATE_DICT, what distributed=fsdp uses to keep checkpoints fast) transformers' save_model writes nothing
    at all, so the shards are gathered here into a full state dict (every rank takes part; rank 0 writes)."""
    if trainer.is_fsdp_enabled and "FULL_STATE_DICT" not in str(trainer.accelerator.state.fsdp_plugin.state_dict_type):
        state = trainer.accelerator.get_state_dict(trainer.model)
        # The gathered copies no longer share storage, so save_pretrained would write tied weights twice (the
        # embedding again as lm_head): leave out the targets the model ties (from_pretrained re-ties them).
        tied = getattr(trainer.accelerator.unwrap_model(trainer.model), "all_tied_weights_keys", None) or {}
        trainer_save(trainer, out, {k: v for k, v in state.items() if k not in tied})
    else:
        trainer.save_model(out)


def run_training(
    run: RunConfig,
    model: Any,
    tokenizer: Any,
    data: Any,
    run_dir: Any,
    tracker: Any = None,
    args: Any = None,
    resume_from: Any = None,
) -> dict[str, Any]:
    """Train with SFTTrainer, evaluate every source before and after, save model + tokenizer + state.

    `resume_from`: a complete checkpoint of this run to continue from (same data order, optimizer, scheduler and RNG
    states). Raises sft_exp.errors.Interrupted when a stop signal ended training (a checkpoint was saved).
    """
    args = args or build_sft_config(run, str(run_dir))
    # eval.generate: the held-out prompts are built now, so a source without enough held-out rows stops the run
    # before training (sft_exp.eval.hooks); None when generation eval is off.
    gen = GenerationInRun.create(run, tokenizer, Path(run_dir), tracker, resume_from)
    gen_callback = gen.callback() if gen is not None else None
    # peft=lora|qlora: a LoraConfig TRL wraps the model with (None: full fine-tuning); see sft_exp.train.peft.
    adapter = peft.setup(run, model, tokenizer, run_dir)
    stopper = StopOnSignal()
    padding_free = run.packing.strategy.value != "none"
    flops_window: dict[str, float] = {}  # the trainer's attention FLOP count, read by the tracking callback's MFU
    trainer = SourceAwareSFTTrainer(
        model=model,
        flops_window=flops_window,
        args=args,
        data_collator=PackedCollator(tokenizer.pad_token_id, padding_free=padding_free),
        train_dataset=data.train,
        eval_dataset=data.eval or None,
        processing_class=tokenizer,
        peft_config=adapter.config,
        source_names=data.source_names,
        # tracking=wandb|tensorboard: logs forwarded with tokens/s and MFU (sft_exp.train.tracking); none adds nothing.
        callbacks=[CompleteCheckpoints(run.train.save_total_limit), stopper]
        + (
            [TrackingCallback(tracker, peak_tflops(run.tracking.peak_tflops), flops_window)]
            if tracker is not None and tracker.backend != "none"
            else []
        )
        + ([gen_callback] if gen_callback is not None else []),
    )
    parameters = adapter.attach(trainer)  # prints trainable / total parameters
    has_eval = bool(data.eval)
    before_file = RunDir(run_dir).eval_before  # kept so that a resumed run still reports it
    before: dict[str, float] = {}

    def eval_before() -> None:
        with rng_preserved():  # see rng_preserved: a resumed run, which skips this eval, must train the same
            before.update(_eval_losses(trainer, data.eval_trained_tokens))
            if gen is not None:  # eval_before_train covers generation too; a failing scorer stops the run here
                gen.before_training(trainer.model)
        if before and is_main_process():
            write_json(before_file, before)

    if resume_from is not None:
        before.update(read_json(before_file) or {})
    elif has_eval and run.eval_before_train:
        _eval_when_training_model_ready(trainer, eval_before)  # inside train(): why, see there
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    if stopper.stopped:
        ckpt = RunDir(run_dir).checkpoint(stopper.step)
        raise Interrupted(stopper.stopped, stopper.step, ckpt if ckpt.is_dir() else None)
    after = _eval_losses(trainer, data.eval_trained_tokens) if has_eval else {}
    with save_guard("final model save", Path(run_dir), Path(run_dir)):  # a failed write: SaveFailed, no metrics.json
        with without_save_progress_bars():
            save_final_model(trainer, str(run_dir))
        trainer.save_state()
        peft_info = adapter.finish(trainer, tokenizer)  # peft.merge=true: <run_dir>/merged/
    # After the save: whatever fails here leaves the model, and metrics.json carries the error (raised after it).
    generation = gen.end(trainer.model, int(trainer.state.global_step)) if gen is not None else {}

    history = trainer.state.log_history
    acc = trainer.accelerator  # counted per rank; summed over ranks here
    by_source = acc.reduce(trainer.trained_tokens_by_source.to(acc.device), reduction="sum").cpu()
    runtime = float(result.metrics.get("train_runtime", 0.0)) or 1e-9
    seen = trainer_tokens_seen(trainer)
    return {
        "train_loss_first": _train_losses(history, data.source_names, 0),
        "train_loss_last": _train_losses(history, data.source_names, -1),
        "eval_loss_before": before,
        "eval_loss_after": after,
        "train_loss_mean": round(mean_train_loss(history, float(result.training_loss)), 6),
        "global_steps": int(trainer.state.global_step),
        "train_runtime_seconds": round(runtime, 2),
        "train_tokens_seen": seen,
        "train_tokens_per_second": round(seen / runtime, 1),
        "trained_tokens": int(by_source.sum()),
        "trained_tokens_per_source": {n: int(v) for n, v in zip(data.source_names, by_source.tolist())},
        "packing_efficiency": data.stats.efficiency,
        # After a resume the token counts cover the resumed steps only (the Trainer's own
        # accounting); the loss history in trainer_state.json is complete.
        "resumed_from": Path(resume_from).name if resume_from is not None else None,
        "world_size": int(args.world_size),
        # Weights of eval "all" (trained tokens of each eval set), so compare can rebuild it at every eval step.
        "eval_trained_tokens": {k: int(v) for k, v in data.eval_trained_tokens.items()},
        **parameters,
        **peft_info,
        **generation,
    }
