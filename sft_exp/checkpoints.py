"""Checkpoints that survive crashes, and stopping on a signal with a checkpoint saved first.

The Trainer writes `checkpoint-N/` file by file; a crash (or SIGKILL, or a full disk) during that leaves a folder
that looks like a checkpoint but is not one. So once every rank has finished writing, rank 0 fsyncs the files and
writes `checkpoint-N/sft_exp_complete.json` (atomically) listing each file with its size. A checkpoint counts only
with that marker and every file it lists at that size; resume takes the newest such checkpoint. The Trainer's own
`save_total_limit` rotation is replaced by ours, because it counts half-written folders and runs before the marker
exists (it could delete the last complete checkpoint and keep a broken one).

SIGTERM and SIGUSR1 (and, under Slurm, the pre-timeout signal) only set a flag; at the next optimizer-step boundary
the ranks agree on it (one tiny all-reduce), save a checkpoint together and stop. `run_training` then raises
`Interrupted`, and the process exits with 128 + the signal number, not looking finished.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

MARKER = "sft_exp_complete.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


# ----------------------------------------------------------------------------------------------- complete or not
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_complete(ckpt: Path, step: int) -> None:
    """Called once every rank has written `ckpt`: make its files durable, then write the marker atomically."""
    files = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != MARKER and not p.name.startswith(f".{MARKER}"):
            _fsync(p)
            files[str(p.relative_to(ckpt))] = p.stat().st_size
    tmp = ckpt / f".{MARKER}.tmp"
    with open(tmp, "w") as f:
        json.dump({"step": step, "files": files, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt / MARKER)
    _fsync(ckpt)


def is_complete(ckpt: Path) -> bool:
    try:
        meta = json.loads((ckpt / MARKER).read_text())
        return all(
            (ckpt / rel).is_file() and (ckpt / rel).stat().st_size == size for rel, size in meta["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Every checkpoint-N folder of a run, complete or not, by step."""
    out = []
    for p in Path(run_dir).glob("checkpoint-*"):
        m = _CKPT.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    for _, p in reversed(checkpoints(run_dir)):
        if is_complete(p):
            return p
    return None


def prune_incomplete(run_dir: Path) -> list[Path]:
    """Delete the half-written checkpoints a crash left (rank 0, before training resumes): the Trainer would
    otherwise write into them again, mixing old and new files."""
    removed = []
    for _, p in checkpoints(run_dir):
        if not is_complete(p):
            shutil.rmtree(p)
            removed.append(p)
    return removed


def rotate(run_dir: Path, keep_last: int | None, protect: str | None = None) -> None:
    """Keep the newest `keep_last` complete checkpoints (and `protect`, the best one); drop incomplete older ones."""
    found = checkpoints(run_dir)
    complete = [p for _, p in found if is_complete(p)]
    doomed = [p for s, p in found if p not in complete and complete and s < _step(complete[-1])]
    if keep_last is not None and keep_last > 0:
        doomed += complete[:-keep_last]
    for p in doomed:
        if protect is None or Path(protect).resolve() != p.resolve():
            shutil.rmtree(p, ignore_errors=True)


def _step(p: Path) -> int:
    return int(p.name.rsplit("-", 1)[1])


# ----------------------------------------------------------------------------------------------- stop on a signal
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


class Interrupted(Exception):
    """Training stopped on a signal after saving `checkpoint`."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        where = f"saved {checkpoint}" if checkpoint else "no checkpoint could be saved"
        super().__init__(f"interrupted by {name} at step {step}: {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _agreed_stop() -> int:
    """The stop signal if any rank received one (max over ranks), so all ranks stop at the same step."""
    import torch
    import torch.distributed as dist

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


def make_callbacks(save_total_limit: int | None) -> tuple[list[Any], Any]:
    """(callbacks for the Trainer, the stop callback whose `.stopped` says whether training ended on a signal)."""
    from transformers import TrainerCallback

    class CompleteCheckpoints(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _barrier()  # every rank's shards, optimizer state and RNG state are on disk
            if state.is_world_process_zero:
                mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)
                rotate(Path(args.output_dir), save_total_limit, state.best_model_checkpoint)

    class StopOnSignal(TrainerCallback):
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

    stop = StopOnSignal()
    return [CompleteCheckpoints(), stop], stop
