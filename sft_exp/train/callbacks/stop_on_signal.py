"""Stop on SIGTERM / SIGUSR1 (or Slurm's pre-timeout signal) with a checkpoint saved first.

Handlers only record the signal; at the next optimizer-step end the ranks agree on it (one tiny all-reduce), save a
checkpoint together and stop. `run_training` then raises `sft_exp.errors.Interrupted` (exit 128 + the signal).
"""

from __future__ import annotations

import signal
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from sft_exp.checkpoints import STOP_SIGNALS


class StopRequest:
    """The first stop signal received (None until then). Handlers only record it: saving happens at a step end.

    Installed only while the Trainer trains (on_train_begin .. on_train_end): before that, while data is prepared or
    the model loads, a signal keeps its usual effect (there is nothing to save yet)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.signums: tuple[int, ...] = STOP_SIGNALS  # sft_exp.launch.slurm adds the pre-timeout signal
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        for s in self.signums:
            self.previous[s] = signal.signal(s, self._record)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def _record(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            print(
                f"[sft-exp] {signal.Signals(signum).name} received: saving a checkpoint at the end of this step",
                flush=True,
            )


STOP = StopRequest()


def _agreed_stop() -> int:
    """The stop signal if any rank received one (max over ranks), so all ranks stop at the same step."""
    flag = STOP.signum or 0
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([flag], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = int(t.item())
    return flag


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class StopOnSignal(TrainerCallback):
    """Saves and stops at the end of the step in which any rank received a stop signal; `.stopped` is the signal."""

    def __init__(self) -> None:
        self.stopped: int | None = None  # the signal
        self.step = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        STOP.install()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        STOP.restore()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        signum = _agreed_stop()
        if signum:
            self.stopped, self.step = signum, state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control
