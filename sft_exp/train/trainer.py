"""SFTTrainer + per-source training loss taken from the fused LM head's per-token log-probs (no second forward).

Loss normalisation (a documented choice): the loss of an optimizer step is the sum of per-token losses over every
trained token of the step (all packed sequences, all gradient-accumulation micro-batches, all ranks when
`average_tokens_across_devices`) divided by the number of those tokens: TRL/transformers' `num_items_in_batch`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_callback import ProgressCallback
from transformers.utils import logging as hf_logging
from trl import SFTTrainer

from sft_exp.checkpoints import save_guard
from sft_exp.compat import trainer_output_dir, trl_eval_metrics
from sft_exp.train.callbacks.progress import LabelledProgress
from sft_exp.train.collator import attention_pairs
from sft_exp.train.distributed import enable_fsdp_on_cpu


class SourceAwareSFTTrainer(SFTTrainer):
    """SFTTrainer that also logs each source's training loss (`loss_<source>`) and counts trained tokens per source."""

    def __init__(
        self, *args: Any, source_names: list[str], flops_window: dict[str, float] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.source_names = source_names
        self._src_sum = torch.zeros(len(source_names), dtype=torch.float64)
        self._src_cnt = torch.zeros(len(source_names), dtype=torch.float64)
        self.trained_tokens_by_source = torch.zeros(len(source_names), dtype=torch.float64)  # whole run, this rank
        # sum of s * (s + 1) over the trained sequences since the last log, this rank; summed over the ranks into
        # flops_window["attention_pairs"] when logging, where sft_exp.train.tracking's MFU reads it
        self._attn_pairs = 0.0
        self.flops_window: dict[str, float] = flops_window if flops_window is not None else {}
        self._last_out: Any = None
        self._eval_prefix: str | None = None
        # Run once by train() as soon as the training model exists, before the first step (see run_training).
        self.on_training_model_ready: Any = None
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        base.register_forward_hook(self._grab_output)
        self.progress: LabelledProgress | None = None
        if self.pop_callback(ProgressCallback) is not None:  # tqdm on: the same bars, labelled
            self.progress = LabelledProgress()
            self.add_callback(self.progress)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
            # accelerate drops the FSDP plugin on CPU ranks (MULTI_CPU), and the Trainer would then run plain
            # DDP without a word; sft_exp.launch.distributed runs real FSDP2 there instead.
            self.is_fsdp_enabled = enable_fsdp_on_cpu(self.accelerator, self.args.fsdp_plugin_args)

    def _grab_output(self, module: Any, args: Any, output: Any) -> None:
        self._last_out = output

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        # A failed write (disk full, permissions, ...) stops the run with SaveFailed; the folder gets no marker.
        out = Path(trainer_output_dir(self, trial))
        ckpt = out / f"checkpoint-{self.state.global_step}"
        with save_guard(f"{ckpt.name} save", ckpt, out), without_save_progress_bars():
            super()._save_checkpoint(model, trial)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        # A checkpoint never holds the weights the model ties (lm_head = the embedding): missing only those is
        # expected, not worth the "missing keys" warning every resume of a tied model would print.
        tied = set(getattr(self.accelerator.unwrap_model(self.model), "all_tied_weights_keys", None) or {})
        missing = set(load_result.missing_keys)
        if missing and missing <= tied and not load_result.unexpected_keys:
            self.accelerator.unwrap_model(self.model).tie_weights()
            return
        super()._issue_warnings_after_load(load_result)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        # TRL's card names the base only for a hub id ("a fine-tuned version of [None]" for a local folder or a
        # random init): written only when it can say what was fine-tuned.
        base = str(getattr(self.model.config, "_name_or_path", "") or "")
        if base and not os.path.isdir(base):
            super().create_model_card(*args, **kwargs)

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
        # Resumed from a checkpoint at max_steps: nothing is left to train (transformers would train one step more).
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        # mixture.resample_each_epoch (PackedDataset.set_epoch): give the dataset its epoch here. accelerate's
        # DataLoaderShard.set_epoch passes it to the dataset only when no wrapped sampler takes it, and a resumed
        # epoch's loader (skip_first_batches: a SkipBatchSampler over the seedable sampler) or a multi-rank one
        # (BatchSamplerShard) has one: resumed inside epoch 2, the run would train the rest of it on epoch 0's rows.
        dataset = getattr(kwargs.get("train_dataloader"), "dataset", None)
        if hasattr(dataset, "set_epoch") and "epoch" in kwargs:
            dataset.set_epoch(kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):  # noqa: ANN001
        self._eval_prefix = metric_key_prefix
        if self.progress is not None:
            self.progress.label = metric_key_prefix.replace("_", " ", 1)  # eval_arith -> "eval arith"
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
            m = trl_eval_metrics(self)
            for key in [k for k in m if not k.startswith(f"{name}_")]:
                m[f"{name}_{key}"] = m.pop(key)
        super().log(logs, start_time)


@contextlib.contextmanager
def without_save_progress_bars() -> Iterator[None]:
    """No "Writing model shards" bar for every save (transformers' own progress bars; the training bar is another)."""
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
