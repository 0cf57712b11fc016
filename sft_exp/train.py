"""SFTTrainer with our packed rows: the collator, per-source loss from the same forward pass, and the SFTConfig.

Data arrives already tokenised, masked and packed (sft_exp.data.pipeline), so TRL's dataset preparation is skipped
(`skip_prepare_dataset`) and TRL's packing is off; the assistant mask becomes `labels` in our collator.

Loss normalisation (a documented choice): the loss of an optimizer step is the sum of per-token losses over every
trained token of the step (all packed sequences, all gradient-accumulation micro-batches, all ranks when
`average_tokens_across_devices`) divided by the number of those tokens. Each trained token weighs the same; a long
answer weighs more than a short one. This is TRL/transformers' `num_items_in_batch` behaviour, kept as is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sft_exp import peft_setup
from sft_exp.config import RunConfig, TrainConfig, check_sft_extra

IGNORE = -100


# ------------------------------------------------------------------------------------------------------ collator
@dataclasses.dataclass
class PackedCollator:
    """Packed rows -> model inputs.

    padding_free=True flattens a batch into one row with position ids restarting at 0 at every sequence, so
    attention never crosses a sequence boundary (transformers derives the block-diagonal mask / varlen cu_seqlens
    from the position ids). padding_free=False pads rows to the longest (used for packing=none).
    The first token of every sequence gets label -100, so no sequence is trained to follow the previous one.
    """

    pad_token_id: int
    padding_free: bool = True

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids, labels, pos, src = [], [], [], []
        for r in rows:
            x = torch.as_tensor(r["input_ids"], dtype=torch.long)
            m = torch.as_tensor(r["assistant_masks"], dtype=torch.bool)
            lens = torch.as_tensor(r["seq_lengths"], dtype=torch.long)
            starts = torch.cumsum(lens, 0) - lens
            p = torch.arange(len(x)) - torch.repeat_interleave(starts, lens)
            lab = torch.where(m, x, torch.full_like(x, IGNORE))
            lab[starts] = IGNORE
            ids.append(x)
            labels.append(lab)
            pos.append(p)
            src.append(torch.repeat_interleave(torch.as_tensor(r["seq_sources"], dtype=torch.long), lens))
        if self.padding_free:
            return {
                "input_ids": torch.cat(ids)[None],
                "labels": torch.cat(labels)[None],
                "position_ids": torch.cat(pos)[None],
                "source_ids": torch.cat(src)[None],
            }
        width = max(len(x) for x in ids)

        def pad(ts: list[Any], value: int) -> Any:
            return torch.stack([torch.nn.functional.pad(t, (0, width - len(t)), value=value) for t in ts])

        return {
            "input_ids": pad(ids, self.pad_token_id),
            "labels": pad(labels, IGNORE),
            "attention_mask": pad([torch.ones_like(x) for x in ids], 0),
            "position_ids": pad(pos, 0),
            "source_ids": pad(src, -1),
        }


def attention_pairs(inputs: dict[str, Any]) -> float:
    """Sum over the batch's sequences of s * (s + 1): the attention term of the training FLOPs
    (6 * n_layers * d_attn * this, causal, document-masked; sft_exp.tracking.train_flops). Padded batches: one sequence
    per row, its attention_mask length; padding-free ones: the sequences the position ids restart at 0 for."""
    import torch

    if inputs.get("attention_mask") is not None:
        lens = inputs["attention_mask"].sum(-1).reshape(-1)
    elif inputs.get("position_ids") is not None:
        pos = inputs["position_ids"].reshape(-1)
        starts = torch.nonzero(pos == 0).reshape(-1)
        ends = torch.cat([starts[1:], torch.tensor([pos.numel()], device=pos.device)])
        lens = ends - starts
    else:
        ids = inputs["input_ids"]
        lens = torch.full((ids.shape[0],), ids.shape[-1], device=ids.device)
    lens = lens.double()
    return float((lens * (lens + 1)).sum())


# ------------------------------------------------------------------------------------------------------ SFTConfig
# SFTConfig fields sft-exp sets itself (from train.* or from other groups); train.extra may not set them.
EXPLICIT_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"extra"} | {
    "output_dir",
    "max_length",
    "packing",
    "padding_free",
    "dataset_kwargs",
    "remove_unused_columns",
    "data_seed",
    "logging_first_step",
    "warmup_steps",
    "use_cpu",
    # set from distributed.* (sft_exp.distributed.trainer_kwargs)
    "ddp_backend",
    "ddp_timeout",
    "ddp_find_unused_parameters",
    "deepspeed",
    "fsdp",
    "fsdp_config",
    "activation_checkpointing",  # train.gradient_checkpointing, under its transformers >= 5.2x name
}

# transformers (5.2x) renamed gradient_checkpointing* to activation_checkpointing* and warns on the old names (gone in
# v6). The config keeps the name the recipe and TRL's docs use; the Trainer gets whichever name it has.
_CHECKPOINTING_RENAMES = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


def _trainer_name(key: str, fields: set[str]) -> str:
    new = _CHECKPOINTING_RENAMES.get(key)
    return new if new is not None and new in fields else key


def build_sft_config(run: RunConfig, output_dir: str) -> Any:
    """RunConfig -> trl.SFTConfig, field by field."""
    from trl import SFTConfig

    from sft_exp.distributed import trainer_kwargs

    t = run.train
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    check_sft_extra(t.extra, fields, EXPLICIT_FIELDS)
    return SFTConfig(
        output_dir=output_dir,
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        lr_scheduler_kwargs=dict(t.lr_scheduler_kwargs),
        # transformers 5 dropped warmup_ratio: a float in [0, 1) given as warmup_steps is read as that ratio.
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        bf16=t.bf16,
        **{_trainer_name("gradient_checkpointing", fields): t.gradient_checkpointing},
        save_strategy=t.save_strategy,
        save_steps=t.save_steps,
        # sft_exp.checkpoints rotates instead (train.save_total_limit): the Trainer's rotation counts half-written
        # checkpoints and runs before a checkpoint is marked complete.
        save_total_limit=None,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy=t.eval_strategy,
        eval_steps=t.eval_steps,
        use_liger_kernel=t.use_liger_kernel,
        report_to=list(t.report_to),
        dataloader_num_workers=t.dataloader_num_workers,
        # DDP / FSDP / DeepSpeed settings, and use_cpu on a machine without a GPU (sft_exp.distributed).
        **trainer_kwargs(run),
        # The assistant mask is applied by our data stage (labels = -100 outside assistant spans); TRL's own
        # assistant_only_loss would re-tokenise conversations, which our pre-tokenised rows no longer are.
        assistant_only_loss=False,
        # Packing is done by sft_exp.data.packing before the trainer sees the data.
        packing=False,
        padding_free=False,
        max_length=run.packing.max_length,
        dataset_kwargs={"skip_prepare_dataset": True},
        # Keep seq_lengths / seq_sources for the collator.
        remove_unused_columns=False,
        **{_trainer_name(k, fields): v for k, v in t.extra.items()},
    )


# ------------------------------------------------------------------------------------------------------ trainer
def make_trainer_class() -> type:
    """SFTTrainer + per-source training loss taken from the fused LM head's per-token log-probs (no 2nd forward)."""
    import torch
    from trl import SFTTrainer

    class SourceAwareSFTTrainer(SFTTrainer):
        def __init__(
            self, *args: Any, source_names: list[str], flops_window: dict[str, float] | None = None, **kwargs: Any
        ) -> None:
            super().__init__(*args, **kwargs)
            self.source_names = source_names
            self._src_sum = torch.zeros(len(source_names), dtype=torch.float64)
            self._src_cnt = torch.zeros(len(source_names), dtype=torch.float64)
            self.trained_tokens_by_source = torch.zeros(len(source_names), dtype=torch.float64)  # whole run, this rank
            # sum of s * (s + 1) over the trained sequences since the last log, this rank; summed over the ranks into
            # flops_window["attention_pairs"] when logging, where sft_exp.tracking's MFU reads it
            self._attn_pairs = 0.0
            self.flops_window: dict[str, float] = flops_window if flops_window is not None else {}
            self._last_out: Any = None
            self._eval_prefix: str | None = None
            # Run once by train() as soon as the training model exists, before the first step (see run_training).
            self.on_training_model_ready: Any = None
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            base.register_forward_hook(self._grab_output)

        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
                # accelerate drops the FSDP plugin on CPU ranks (MULTI_CPU), and the Trainer would then run plain
                # DDP without a word; sft_exp.distributed runs real FSDP2 there instead.
                from sft_exp.distributed import enable_fsdp_on_cpu

                self.is_fsdp_enabled = enable_fsdp_on_cpu(self.accelerator, self.args.fsdp_plugin_args)

        def _grab_output(self, module: Any, args: Any, output: Any) -> None:
            self._last_out = output

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            # A failed write (disk full, permissions, ...) stops the run with SaveFailed; the folder gets no marker.
            from sft_exp.checkpoints import save_guard

            out = Path(self._get_output_dir(trial=trial))
            ckpt = out / f"checkpoint-{self.state.global_step}"
            with save_guard(f"{ckpt.name} save", ckpt, out):
                super()._save_checkpoint(model, trial)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            source_ids = inputs.pop("source_ids", None)
            self._last_out = None
            if self.model.training:
                self._attn_pairs += attention_pairs(inputs)
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            out = self._last_out
            if self.model.training and source_ids is not None and getattr(out, "log_probs", None) is not None:
                with torch.no_grad():
                    src = source_ids[:, 1:].reshape(-1).to(out.log_probs.device)  # aligned with shifted labels
                    keep = out.label_mask.reshape(-1) & (src >= 0)
                    nll = -out.log_probs.detach().reshape(-1)[keep].double().cpu()
                    s = src[keep].cpu()
                    self._src_sum.index_add_(0, s, nll)
                    self._src_cnt.index_add_(0, s, torch.ones_like(nll))
                    self.trained_tokens_by_source.index_add_(0, s, torch.ones_like(nll))
            return result

        def _prepare_for_training(self, *args: Any, **kwargs: Any) -> Any:
            # transformers 5: wraps the model (DeepSpeed engine, DDP), creates optimizer and scheduler, loads a
            # checkpoint; on_train_begin and the train_runtime clock come after it.
            prepared = super()._prepare_for_training(*args, **kwargs)
            plain_multi_rank = self.args.world_size > 1 and not (self.is_deepspeed_enabled or self.is_fsdp_enabled)
            if plain_multi_rank and not isinstance(self.model_wrapped, torch.nn.parallel.DistributedDataParallel):
                # Never train ranks that do not all-reduce their gradients (see _eval_when_training_model_ready).
                raise RuntimeError(
                    f"{self.args.world_size} ranks but the model is not wrapped in DistributedDataParallel "
                    f"({type(self.model_wrapped).__name__}): gradients would not be synchronised"
                )
            hook, self.on_training_model_ready = self.on_training_model_ready, None
            if hook is not None:
                hook()
            return prepared

        def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
            # Resumed from the checkpoint of the last step (saved on a stop signal at max_steps, or before a final
            # save failed): nothing is left to train. transformers 5.24 would still train one more step, because
            # _inner_training_loop only stops at max_steps in on_step_end, after a step: with max_steps inside an
            # epoch, epochs_trained = global_step // steps_per_epoch < num_train_epochs and the epoch loop resumes
            # at update step global_step, trains step max_steps + 1, then stops. Skipping the epoch (no step, and no
            # second log/save of the last step, already in the checkpoint) leaves train() to finish the run as the
            # uninterrupted one did.
            if 0 < self.state.max_steps <= self.state.global_step:
                self.control.should_training_stop = True
                return None
            return super()._run_epoch(*args, **kwargs)

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):  # noqa: ANN001
            self._eval_prefix = metric_key_prefix
            try:
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            finally:
                self._eval_prefix = None

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            # Every rank logs (only rank 0 writes), so every rank joins this reduce: no rank-dependent condition.
            if self.model.training and "loss" in logs:
                # One collective for the per-source sums and counts and the attention FLOP count.
                pairs = torch.tensor([self._attn_pairs], dtype=torch.float64)
                local = torch.cat([self._src_sum, self._src_cnt, pairs]).to(self.accelerator.device)
                total = self.accelerator.reduce(local, reduction="sum").cpu()
                n = len(self.source_names)
                sums, cnts = total[:n], total[n : 2 * n]
                for i, name in enumerate(self.source_names):
                    if cnts[i] > 0:
                        logs[f"loss_{name}"] = round(float(sums[i] / cnts[i]), 6)
                self.flops_window["attention_pairs"] = float(total[-1])
                self._src_sum.zero_()
                self._src_cnt.zero_()
                self._attn_pairs = 0.0
            if not self.model.training and self._eval_prefix and self._eval_prefix != "eval":
                # TRL logs its eval extras (entropy, token accuracy) without the dataset name; add it.
                name = self._eval_prefix.removeprefix("eval_")
                m = self._metrics["eval"]
                for key in [k for k in m if not k.startswith(f"{name}_")]:
                    m[f"{name}_{key}"] = m.pop(key)
            super().log(logs, start_time)

    return SourceAwareSFTTrainer


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

    trainer.evaluate() before train() silently breaks DDP (transformers 5.24 + accelerate 1.15): evaluation_loop
    prepares the bare model with accelerator.prepare_model(evaluation_mode=True), which marks it
    `_is_accelerate_prepared`; train()'s accelerator.prepare(model, optimizer) then returns it as is, never wrapped in
    DistributedDataParallel, so gradients are not all-reduced and every rank trains on its own shard of the data
    (found through a requeued Slurm job that resumed, without that eval, to other losses than the uninterrupted run).

    It cannot work under DeepSpeed either: without an engine,
    evaluation_loop calls deepspeed_init(inference=True), which refuses ZeRO-1/2 ("ZeRO inference only makes sense
    with ZeRO Stage 3") and under ZeRO-3 builds an inference engine without optimizer (deleting the optimizer and
    scheduler sections of the DeepSpeed config on the way) and leaves it in trainer.model_wrapped / trainer.deepspeed.
    train() then frees the accelerator's engines but still finds model_wrapped wrapped, so it skips
    accelerator.prepare(model, optimizer): no training engine is made, and the first backward fails with
    "'NoneType' object has no attribute 'backward'" (accelerator.deepspeed_engine_wrapped is None).

    Here the eval runs once the Trainer has built the training engine (the same forward every mid-training eval
    uses), before on_train_begin and the train_runtime clock, so runtime and tokens/s cover training only. Its log row
    is logged (callbacks, trackers at step 0) and then dropped from the training state, so trainer_state.json holds
    the training history only, as when the eval ran before train() (whose state reset dropped it).
    """
    from transformers import Trainer

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


def _mean_train_loss(history: list[dict[str, Any]], fallback: float) -> float:
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
    import random

    import torch

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
        trainer._save(out, state_dict={k: v for k, v in state.items() if k not in tied})
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
    states). Raises sft_exp.checkpoints.Interrupted when a stop signal ended training (a checkpoint was saved).
    """
    from sft_exp.checkpoints import Interrupted, make_callbacks, save_guard
    from sft_exp.distributed import is_main_process
    from sft_exp.rundir import write_json
    from sft_exp.tracking import make_callback, peak_tflops

    args = args or build_sft_config(run, str(run_dir))
    # peft=lora|qlora: a LoraConfig TRL wraps the model with (None: full fine-tuning); see sft_exp.peft_setup.
    adapter = peft_setup.setup(run, model, tokenizer, run_dir)
    ckpt_callbacks, stopper = make_callbacks(run.train.save_total_limit)
    padding_free = run.packing.enabled and run.packing.strategy.value != "none"
    flops_window: dict[str, float] = {}  # the trainer's attention FLOP count, read by the tracking callback's MFU
    trainer = make_trainer_class()(
        model=model,
        flops_window=flops_window,
        args=args,
        data_collator=PackedCollator(tokenizer.pad_token_id, padding_free=padding_free),
        train_dataset=data.train,
        eval_dataset=data.eval or None,
        processing_class=tokenizer,
        peft_config=adapter.config,
        source_names=data.source_names,
        # tracking=wandb|tensorboard: logs forwarded with tokens/s and MFU (sft_exp.tracking); none adds nothing.
        callbacks=ckpt_callbacks
        + (
            [make_callback(tracker, peak_tflops(run.tracking.peak_tflops), flops_window)]
            if tracker is not None and tracker.backend != "none"
            else []
        ),
    )
    parameters = adapter.attach(trainer)  # prints trainable / total parameters
    has_eval = bool(data.eval)
    before_file = Path(run_dir) / "eval_loss_before.json"  # kept so that a resumed run still reports it
    before: dict[str, float] = {}

    def eval_before() -> None:
        with rng_preserved():  # see rng_preserved: a resumed run, which skips this eval, must train the same
            before.update(_eval_losses(trainer, data.eval_trained_tokens))
        if before and is_main_process():
            write_json(before_file, before)

    if resume_from is not None:
        before.update(json.loads(before_file.read_text()) if before_file.exists() else {})
    elif has_eval and run.eval_before_train:
        _eval_when_training_model_ready(trainer, eval_before)  # inside train(): why, see there
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    if stopper.stopped:
        ckpt = Path(run_dir) / f"checkpoint-{stopper.step}"
        raise Interrupted(stopper.stopped, stopper.step, ckpt if ckpt.is_dir() else None)
    after = _eval_losses(trainer, data.eval_trained_tokens) if has_eval else {}
    with save_guard("final model save", Path(run_dir), Path(run_dir)):  # a failed write: SaveFailed, no metrics.json
        save_final_model(trainer, str(run_dir))
        trainer.save_state()
        peft_info = adapter.finish(trainer, tokenizer)  # peft.merge=true: <run_dir>/merged/

    history = trainer.state.log_history
    acc = trainer.accelerator  # counted per rank; summed over ranks here
    by_source = acc.reduce(trainer.trained_tokens_by_source.to(acc.device), reduction="sum").cpu()
    runtime = float(result.metrics.get("train_runtime", 0.0)) or 1e-9
    seen = int(getattr(trainer, "_total_train_tokens", 0))
    return {
        "train_loss_first": _train_losses(history, data.source_names, 0),
        "train_loss_last": _train_losses(history, data.source_names, -1),
        "eval_loss_before": before,
        "eval_loss_after": after,
        "train_loss_mean": round(_mean_train_loss(history, float(result.training_loss)), 6),
        "global_steps": int(trainer.state.global_step),
        "train_runtime_seconds": round(runtime, 2),
        "train_tokens_seen": seen,
        "train_tokens_per_second": round(seen / runtime, 1),
        "trained_tokens": int(by_source.sum()),
        "trained_tokens_per_source": {n: int(v) for n, v in zip(data.source_names, by_source.tolist())},
        "packing_efficiency": data.stats["packing"]["efficiency"],
        # After a resume the token counts cover the resumed steps only (the Trainer's own
        # accounting); the loss history in trainer_state.json is complete.
        "resumed_from": Path(resume_from).name if resume_from is not None else None,
        "world_size": int(args.world_size),
        # Weights of eval "all" (trained tokens of each eval set), so compare can rebuild it at every eval step.
        "eval_trained_tokens": {k: int(v) for k, v in data.eval_trained_tokens.items()},
        **parameters,
        **peft_info,
    }
