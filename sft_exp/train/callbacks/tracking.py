"""Training logs -> the tracker (W&B / TensorBoard), with tokens/s and MFU."""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback

from sft_exp.train.tracking import Tracker, attention_width, rename, train_flops


class TrackingCallback(TrainerCallback):
    """Forwards the trainer's logs to a Tracker, adding tokens/s and (on a GPU) MFU.

    flops_window: filled by the trainer at each training log with "attention_pairs", the sum of s * (s + 1) over the
    sequences all ranks trained on since the previous log (without it, MFU leaves the attention term out)."""

    def __init__(
        self, tracker: Tracker, peak: float | None = None, flops_window: dict[str, float] | None = None
    ) -> None:
        self.tracker, self.peak = tracker, peak
        self.window = flops_window if flops_window is not None else {}
        self.t0 = time.perf_counter()
        self.tokens0 = 0.0
        self.n_params = 0
        self.n_layers = self.d_attn = 0
        self.world = 1
        self.mfu: list[float] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.t0 = time.perf_counter()
        self.world = max(1, int(getattr(args, "world_size", 1)))
        if model is not None:
            from sft_exp.train.model import count_parameters  # ZeRO-3 partitions (numel() 0) counted too

            self.n_params = count_parameters(model)[1]  # ZeRO-3 partitions (numel() 0) counted too
            cfg = getattr(model, "config", None)
            if cfg is not None and hasattr(cfg, "num_attention_heads"):
                self.n_layers, self.d_attn = int(cfg.num_hidden_layers), attention_width(cfg)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        metrics = rename(logs)
        is_train = "loss" in logs and not any(k.startswith("eval_") for k in logs)
        if is_train and "num_tokens" in logs:
            now = time.perf_counter()
            tokens = float(logs["num_tokens"])
            if now > self.t0 and tokens > self.tokens0:
                tps = (tokens - self.tokens0) / (now - self.t0)
                metrics["train/tokens_per_second"] = round(tps, 1)
                if self.peak and self.n_params:
                    # Model FLOPs (train_flops: weights and causal document-masked attention) over the peak of
                    # all the ranks' accelerators.
                    pairs = self.window.pop("attention_pairs", 0.0)
                    flops = train_flops(self.n_params, self.n_layers, self.d_attn, tokens - self.tokens0, pairs)
                    mfu = flops / (now - self.t0) / self.world / (self.peak * 1e12)
                    metrics["train/mfu"] = round(mfu, 4)
                    self.mfu.append(mfu)
            self.t0, self.tokens0 = now, tokens
        self.tracker.log(metrics, state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.is_world_process_zero and self.mfu:
            self.tracker.summary({"final/mfu": round(sum(self.mfu) / len(self.mfu), 4)})
