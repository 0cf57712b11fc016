"""N ranks on this machine, spawned by the process that composed the config (the torchrun role, without torchrun).

Each rank is `python -m sft_exp.launch.rank <run dir>` with RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT set, the same contract as a Slurm task, so both paths share sft_exp.launch.rank. The parent:
- forwards SIGTERM and SIGUSR1 to every rank (they save a checkpoint together and exit 128 + signal);
- when a rank fails, kills the others at once (they would otherwise wait on a collective with a dead peer);
- a killed launcher takes its ranks with it (PR_SET_PDEATHSIG, set by each rank): no orphans keep training.
Each rank gets cores / N threads (OMP_NUM_THREADS, unless already set) so N ranks do not oversubscribe the CPU.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from sft_exp.checkpoints import SAVE_FAILED_EXIT, STOP_SIGNALS, Interrupted, SaveFailed, last_complete_checkpoint
from sft_exp.config import RunConfig
from sft_exp.distributed import cpu_cores

INTERRUPTED_CODES = {128 + s for s in STOP_SIGNALS}
STOP_GRACE_S = 300  # after one rank stopped on a signal, how long the others may take to finish the same save


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


LAUNCHER_PID = "SFT_EXP_LAUNCHER_PID"


def die_with_launcher() -> None:
    """In a spawned rank: get SIGKILL when the launcher dies (Linux), so a killed launcher leaves no orphans."""
    launcher = os.environ.get(LAUNCHER_PID)
    if not launcher:
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(launcher):  # it died before the prctl took effect
        os._exit(1)


def spawn_ranks(run: RunConfig, run_dir: Path, n: int, resume_from: Path | None) -> None:
    """Run N ranks to the end. Raises Interrupted (a stop signal, checkpoint saved) or RuntimeError (a rank failed)."""
    port = run.distributed.master_port or free_port()
    cmd = [sys.executable, "-m", "sft_exp.launch.rank", str(run_dir)]
    if resume_from is not None:
        cmd += ["--resume-from", str(resume_from)]
    procs: list[subprocess.Popen] = []

    def forward(signum: int, frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        for r in range(n):
            env = {
                **os.environ,
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": str(n),
                "LOCAL_WORLD_SIZE": str(n),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                LAUNCHER_PID: str(os.getpid()),
            }
            env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_cores() // n)))
            procs.append(subprocess.Popen(cmd, env=env))
        codes, first = _wait(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for s, h in previous.items():
            signal.signal(s, h)

    if all(c == 0 for c in codes):
        return
    failed = [c for c in codes if c != 0]
    if all(c in INTERRUPTED_CODES for c in failed):
        ckpt = last_complete_checkpoint(run_dir)
        step = int(ckpt.name.rsplit("-", 1)[1]) if ckpt else 0
        raise Interrupted(failed[0] - 128, step, ckpt)
    r, c = first, codes[first]
    if c == SAVE_FAILED_EXIT:  # the rank printed what failed and where; the launcher adds how to continue
        raise SaveFailed(f"a save by rank {r} of {n}", run_dir, run_dir, None, "its error is printed above")
    how = f"was killed by {signal.Signals(-c).name}" if c < 0 else f"exited with code {c}"
    raise RuntimeError(f"rank {r} of {n} {how} (its error is printed above); the other ranks were stopped")


def _wait(procs: list[subprocess.Popen]) -> tuple[list[int], int]:
    """-> (exit codes, the rank that failed first on its own: the one whose error explains the run's)."""
    stop_deadline = None
    first = -1
    while True:
        codes = [p.poll() for p in procs]
        if first < 0:
            first = next((r for r, c in enumerate(codes) if c not in (None, 0)), -1)
        if all(c is not None for c in codes):
            return [int(c) for c in codes], max(first, 0)  # type: ignore[arg-type]
        bad = [c for c in codes if c is not None and c != 0]
        if bad and any(c not in INTERRUPTED_CODES for c in bad):
            for p in procs:
                if p.poll() is None:
                    p.kill()
            return [int(p.wait()) for p in procs], first
        if bad:  # stopped on a signal: the others are finishing the same checkpoint
            stop_deadline = stop_deadline or time.monotonic() + STOP_GRACE_S
            if time.monotonic() > stop_deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
        time.sleep(0.2)
