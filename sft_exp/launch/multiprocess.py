"""N ranks on this machine, spawned by the process that composed the config (the torchrun role, without torchrun).

Each rank is `python -m sft_exp.launch.rank <run dir>` with RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT set, the same contract as a Slurm task, so both paths share sft_exp.launch.rank. The parent:
- forwards SIGTERM and SIGUSR1 to every rank (they save a checkpoint together and exit 128 + signal);
- when a rank fails, gives the others a few seconds to exit, then kills them (they would otherwise wait on a
  collective with a dead peer);
- a killed launcher takes its ranks with it (PR_SET_PDEATHSIG, set by each rank): no orphans keep training.
Each rank gets cores / N threads (OMP_NUM_THREADS, unless already set) so N ranks do not oversubscribe the CPU.

Output: each rank's stdout and stderr are copied, live, onto the launcher's and, complete, into
<run dir>/logs/rank<N>.log (appended by every attempt). When one rank fails, the others fail too, on the collective
with the peer that is gone (gloo: "Connection closed by peer"), each with a traceback that explains nothing. So a
rank's stderr is held back from a traceback on, and every other rank's output once the launcher saw a rank fail; at
the end the launcher shows what it held of the rank whose error explains the failure (a rank that reported a clear
error, exit 2 or 74, before one that lost its peer) and points to the log files for the rest.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from sft_exp.checkpoints import STOP_SIGNALS, SaveFailed, last_complete_checkpoint
from sft_exp.config import ConfigError, RunConfig
from sft_exp.config.preflight import cpu_cores
from sft_exp.errors import SAVE_FAILED_EXIT, Interrupted

INTERRUPTED_CODES = {128 + s for s in STOP_SIGNALS}
CLEAR_CODES = {2, SAVE_FAILED_EXIT}  # a rank that exits so printed what went wrong (sft_exp.launch.rank)
STOP_GRACE_S = 300  # after one rank stopped on a signal, how long the others may take to finish the same save
FAILURE_GRACE_S = 3.0  # after one rank failed, how long the others may take to exit (and report) before a SIGKILL
HOLD_S = 10.0  # a traceback of a rank that goes on running (nobody failed) is shown after this long
RANK_MODULE = "sft_exp.launch.rank"
LOGS = "logs"


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


def rank_log(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / LOGS / f"rank{rank}.log"


def spawn_ranks(run: RunConfig, run_dir: Path, n: int, resume_from: Path | None) -> None:
    """Run N ranks to the end. Raises Interrupted (a stop signal, checkpoint saved), SaveFailed (a rank's save failed),
    ConfigError (a rank's config or data error) or RuntimeError (a rank failed otherwise)."""
    port = run.distributed.master_port or free_port()
    cmd = [sys.executable, "-m", RANK_MODULE, str(run_dir)]
    if resume_from is not None:
        cmd += ["--resume-from", str(resume_from)]
    procs: list[subprocess.Popen] = []
    ranks: list[_RankOutput] = []

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
                "PYTHONUNBUFFERED": "1",  # the launcher forwards the output as it comes
            }
            env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_cores() // n)))
            p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            procs.append(p)
            head = f"started {time.strftime('%Y-%m-%dT%H:%M:%S%z')}: rank {r} of {n}, pid {p.pid}"
            ranks.append(_RankOutput(p, rank_log(run_dir, r), head + (f", from {resume_from}" if resume_from else "")))
        codes, first = _wait(procs, ranks)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for out in ranks:
            out.close()
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
    quiet = [q for q, out in enumerate(ranks) if q != r and out.held_back]
    if quiet:  # e.g. a gloo "Connection closed by peer" traceback: a consequence, not news
        which = f"rank {quiet[0]}" if len(quiet) == 1 else f"ranks {', '.join(map(str, quiet))}"
        logs = ", ".join(str(rank_log(run_dir, q)) for q in quiet)
        print(
            f"[sft-exp] {which} stopped after rank {r} failed; what {which} printed then is not shown here: see {logs}",
            file=sys.stderr,
            flush=True,
        )
    if c == SAVE_FAILED_EXIT:  # the rank printed what failed and where; the launcher adds how to continue
        raise SaveFailed(f"a save by rank {r} of {n}", run_dir, run_dir, None, "its error is printed above")
    if c == 2:
        raise ConfigError(f"rank {r} of {n} stopped on the error printed above; the other ranks were stopped")
    how = f"was killed by {signal.Signals(-c).name}" if c < 0 else f"exited with code {c}"
    raise RuntimeError(
        f"rank {r} of {n} {how} (its error is printed above, its output is in {rank_log(run_dir, r)}); "
        "the other ranks were stopped"
    )


def _wait(procs: list[subprocess.Popen], ranks: list[_RankOutput]) -> tuple[list[int], int]:
    """-> (exit codes, the rank whose failure explains the run's), showing what its output held back."""
    stop_deadline = None
    failed_at: dict[int, int] = {}  # rank -> the poll (0, 1, ...) that first saw it fail: the order of failures
    killed: set[int] = set()
    kill_at = None
    polls = 0
    while True:
        codes = [p.poll() for p in procs]
        for r, c in enumerate(codes):
            if c not in (None, 0) and r not in failed_at:
                failed_at[r] = polls
        polls += 1
        if all(c is not None for c in codes):
            break
        bad = [c for c in codes if c is not None and c != 0]
        if bad and any(c not in INTERRUPTED_CODES for c in bad):
            if kill_at is None:  # from now on, the others' output is a consequence: held back
                kill_at = time.monotonic() + FAILURE_GRACE_S
                for out in ranks:
                    out.hold_everything()
            elif time.monotonic() > kill_at:
                for r, p in enumerate(procs):
                    if p.poll() is None:
                        killed.add(r)
                        p.kill()
        elif bad:  # stopped on a signal: the others are finishing the same checkpoint
            stop_deadline = stop_deadline or time.monotonic() + STOP_GRACE_S
            if time.monotonic() > stop_deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
        else:
            for out in ranks:
                out.release_stale()
        time.sleep(0.05)
    final = [int(c) for c in codes]  # type: ignore[arg-type]
    for out in ranks:
        out.join()
    failures = [r for r, c in enumerate(final) if c != 0 and c not in INTERRUPTED_CODES]
    if not failures:
        for out in ranks:
            out.release()
        return final, next((r for r, c in enumerate(final) if c != 0), 0)
    first = min(
        failures,
        key=lambda r: (r in killed, final[r] not in CLEAR_CODES, ranks[r].lost_peer(), failed_at.get(r, polls), r),
    )
    ranks[first].release()
    return final, first


# ------------------------------------------------------------------------------------------------ rank output
TRACEBACK = b"Traceback (most recent call last):"
_PREFIX = re.compile(rb"^(\[rank\d+\]: ?)?")  # torch.distributed prefixes a rank's traceback lines with [rankN]:
_LOST_PEER = re.compile(
    rb"Connection closed by peer|Connection reset by peer|remote worker crash|Broken pipe|DistNetworkError|"
    rb"NCCL communicator was aborted|remote process exited",
    re.I,
)
_LINES = re.compile(rb"(?<=[\r\n])")


class _RankOutput:
    """One rank's stdout and stderr: copied whole into its log file and, live, onto the launcher's own streams,
    except what is held back (its stderr from a traceback on; everything once another rank failed)."""

    def __init__(self, proc: subprocess.Popen, log_path: Path, header: str) -> None:
        self.lock = threading.Lock()
        self.held: list[tuple[IO[bytes], bytes]] = []
        self.held_since: float | None = None
        self.hold_all = False
        self.log: Any = None
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
            self.log.write(f"----- {header}\n".encode())
        except OSError as e:  # a full disk must not stop the run here: the output still reaches the terminal
            print(f"[sft-exp] warning: cannot write {log_path}: {e}", file=sys.stderr, flush=True)
            self.log = None
        assert proc.stdout is not None and proc.stderr is not None
        self.threads = [
            threading.Thread(target=self._copy, args=(proc.stdout, _binary(sys.stdout), False), daemon=True),
            threading.Thread(target=self._copy, args=(proc.stderr, _binary(sys.stderr), True), daemon=True),
        ]
        for t in self.threads:
            t.start()

    # -- the copying threads
    def _copy(self, pipe: IO[bytes], out: IO[bytes], watch: bool) -> None:
        fd, partial = pipe.fileno(), b""
        while True:
            ready, _, _ = select.select([fd], [], [], 0.1)
            chunk = os.read(fd, 1 << 16) if ready else None
            if chunk == b"":
                break
            if chunk:
                self._write_log(chunk)
                *lines, partial = _LINES.split(partial + chunk)
            else:  # nothing new for a while: show a progress bar's last update (not a traceback being written)
                lines, partial = ([partial], b"") if partial and not _may_start_traceback(partial) else ([], partial)
            with self.lock:
                for line in lines:
                    self._emit(out, line, watch)
        with self.lock:
            if partial:
                self._emit(out, partial, watch)
        pipe.close()

    def _write_log(self, data: bytes) -> None:
        with self.lock:
            if self.log is None:
                return
            try:
                self.log.write(data)
                self.log.flush()
            except OSError:
                self.log = None  # a full disk: stop logging, never stop draining the pipe

    def _emit(self, out: IO[bytes], line: bytes, watch: bool) -> None:
        if not self.hold_all and self.held_since is None and watch and TRACEBACK in line:
            self.held_since = time.monotonic()
        if self.hold_all or self.held_since is not None:
            self.held.append((out, line))
        else:
            _show(out, line)

    # -- the launcher
    def hold_everything(self) -> None:
        with self.lock:
            self.hold_all = True

    def release_stale(self) -> None:
        """A traceback of a rank still running while every rank is fine (a logged error): show it after HOLD_S."""
        with self.lock:
            if self.held_since is not None and time.monotonic() - self.held_since > HOLD_S and not self.hold_all:
                self._show_held()

    def release(self) -> None:
        with self.lock:
            self._show_held()

    def lost_peer(self) -> bool:
        with self.lock:
            return any(_LOST_PEER.search(line) for _, line in self.held)

    def join(self, timeout: float = 10.0) -> None:
        for t in self.threads:
            t.join(timeout)  # a grandchild could hold a pipe open: do not wait for it forever

    @property
    def held_back(self) -> bool:
        """Something was held back and never shown."""
        with self.lock:
            return bool(self.held)

    def close(self) -> None:
        with self.lock:
            if self.log is not None:
                try:
                    self.log.close()
                except OSError:
                    pass
                self.log = None

    def _show_held(self) -> None:
        for out, line in self.held:
            _show(out, line)
        self.held, self.held_since, self.hold_all = [], None, False


def _may_start_traceback(partial: bytes) -> bool:
    rest = _PREFIX.sub(b"", partial, count=1)
    return TRACEBACK.startswith(rest[: len(TRACEBACK)]) if rest else partial.startswith(b"[")


def _binary(stream: Any) -> IO[bytes]:
    return getattr(stream, "buffer", stream)


def _show(out: IO[bytes], data: bytes) -> None:
    try:
        out.write(data)
        out.flush()
    except (OSError, ValueError, TypeError):  # a closed or text-only stream: the log file has it
        pass
