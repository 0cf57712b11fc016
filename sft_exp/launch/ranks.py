"""N ranks of a run on this machine, started by torch elastic (`start_processes`), and the rank entry point.

Contract:
- The launcher prepares the data once and freezes the run directory; then `start_ranks` starts N copies of
  `python -m sft_exp.launch.ranks <run dir> [--resume-from <checkpoint>]` with RANK, LOCAL_RANK, WORLD_SIZE,
  LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT (the torchrun environment) and OMP_NUM_THREADS = cores // N unless set.
  A Slurm task calls `run_rank` in-process with the same environment (sft_exp.launch.slurm).
- Each rank's stdout and stderr go to <run dir>/logs/rank<N>.log (shown live on the launcher's stdout); an earlier
  attempt's logs move to logs/attempt-<k>/. A rank prints no traceback: its error goes to logs/rank<N>.error.json
  (torch elastic's error file, `@record`) before the process group is torn down, so the first error file written is
  the root cause; the ranks that lost their peer then fail later and quietly.
- Exit codes of a rank: 0 done; 128 + signal after SIGTERM/SIGUSR1 (forwarded by the launcher; the ranks save a
  checkpoint together); `sft_exp.errors.exit_code_of` of a clear error (2 config/data/template, 74 a failed save),
  printed as `[rank N] error: ...`; 1 otherwise.
- `start_ranks` turns them into one error: Interrupted (with the last complete checkpoint), SaveFailed, ConfigError,
  or RuntimeError with the root-cause rank's traceback; a line names the logs of the ranks it took down.
- A killed launcher takes its ranks with it (PR_SET_PDEATHSIG in each rank); SIGINT/SIGHUP/SIGQUIT close them.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from torch.distributed.elastic.multiprocessing import (
    LogsDest,
    LogsSpecs,
    ProcessFailure,
    SignalException,
    start_processes,
)
from torch.distributed.elastic.multiprocessing.errors import get_error_handler, record
from torch.distributed.elastic.utils.distributed import get_free_port

from sft_exp.checkpoints import STOP_SIGNALS, SaveFailed, last_complete_checkpoint
from sft_exp.config import RunConfig
from sft_exp.config.preflight import cpu_cores
from sft_exp.errors import SAVE_FAILED_EXIT, ConfigError, Interrupted, exit_code_of
from sft_exp.rundir import RunDir

RANK_MODULE = "sft_exp.launch.ranks"
LAUNCHER_PID = "SFT_EXP_LAUNCHER_PID"
STOPPED = {128 + s for s in STOP_SIGNALS}  # a rank that saved a checkpoint and stopped on a forwarded signal
CLOSED = -signal.SIGTERM  # a rank torch elastic closed because another one had ended


def error_file(run_dir: Path, rank: int) -> Path:
    return RunDir(run_dir).logs / f"rank{rank}.error.json"


class RunDirLogs(LogsSpecs):
    """torch elastic's log layout for a run: logs/rank<N>.log (stdout and stderr, tee'd) and logs/rank<N>.error.json."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(log_dir=str(RunDir(run_dir).logs))
        self.run_dir = run_dir

    @property
    def root_log_dir(self) -> str:
        return str(RunDir(self.run_dir).logs)

    def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
        logs = {r: str(RunDir(self.run_dir).rank_log(r)) for r in envs}
        errors = {r: str(error_file(self.run_dir, r)) for r in envs}
        for r, env in envs.items():
            env["TORCHELASTIC_ERROR_FILE"] = errors[r]
        return LogsDest(stdouts=logs, stderrs=dict(logs), tee_stdouts=dict(logs), error_files=errors)


def start_ranks(run: RunConfig, run_dir: Path, n: int, resume_from: Path | None) -> None:
    """Run N ranks on the frozen `run_dir` to the end. Raises Interrupted (a stop signal, checkpoint saved),
    SaveFailed (a rank's save failed), ConfigError (a rank's config or data error) or RuntimeError."""
    logs = RunDir(run_dir).logs
    logs.mkdir(parents=True, exist_ok=True)
    earlier = sorted(logs.glob("rank*"))
    if earlier:  # torch truncates the log files: keep an earlier attempt's
        keep = logs / f"attempt-{len(list(logs.glob('attempt-*'))) + 1}"
        keep.mkdir()
        for p in earlier:
            p.rename(keep / p.name)
    world = {
        "WORLD_SIZE": str(n),
        "LOCAL_WORLD_SIZE": str(n),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(run.distributed.master_port or get_free_port()),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(max(1, cpu_cores() // n)),
        "PYTHONUNBUFFERED": "1",  # the launcher shows the log files as they grow
        LAUNCHER_PID: str(os.getpid()),
    }
    args = ("-m", RANK_MODULE, str(run_dir), *(("--resume-from", str(resume_from)) if resume_from else ()))
    handled = (*STOP_SIGNALS, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
    previous = {s: signal.getsignal(s) for s in handled}
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    # Its log lines on closing the ranks would name the first rank it saw end, not the root cause reported here.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    pc = None
    try:
        pc = start_processes(
            name="rank",
            entrypoint=sys.executable,
            args=dict.fromkeys(range(n), args),
            envs={r: {**world, "RANK": str(r), "LOCAL_RANK": str(r)} for r in range(n)},
            logs_specs=RunDirLogs(run_dir),
            log_line_prefixes=dict.fromkeys(range(n), ""),
        )

        def forward(signum: int, frame: object) -> None:
            for pid in pc.pids().values():  # type: ignore[union-attr]
                with suppress(ProcessLookupError):
                    os.kill(pid, signum)

        for s in STOP_SIGNALS:  # the ranks stop together at a step end, with a checkpoint
            signal.signal(s, forward)
        result = pc.wait(period=0.1)  # when one rank fails, torch elastic closes the others (SIGTERM, then SIGKILL)
    except SignalException as e:  # SIGINT, SIGHUP, SIGQUIT: torch elastic's handler
        raise SystemExit(128 + e.sigval) from None
    finally:
        if pc is not None:
            pc.close()
        for s, h in previous.items():
            signal.signal(s, h)
    if result is not None and result.is_failed():
        _raise_failure(run_dir, n, result.failures)


def _raise_failure(run_dir: Path, n: int, failures: dict[int, ProcessFailure]) -> None:
    codes = {r: f.exitcode for r, f in failures.items()}
    if any(c in STOPPED for c in codes.values()) and all(c in STOPPED or c == CLOSED for c in codes.values()):
        ckpt = last_complete_checkpoint(run_dir)
        step = int(ckpt.name.rsplit("-", 1)[1]) if ckpt else 0
        raise Interrupted(next(c for c in codes.values() if c in STOPPED) - 128, step, ckpt)
    first = min(failures.values(), key=_root_cause_order)
    r, c = first.local_rank, first.exitcode
    others = sorted(set(failures) - {r})
    if others:
        which = f"rank {others[0]}" if len(others) == 1 else f"ranks {', '.join(map(str, others))}"
        files = [str(p) for q in others for p in (RunDir(run_dir).rank_log(q), error_file(run_dir, q)) if p.exists()]
        print(f"[sft-exp] {which} stopped after rank {r} failed; see {', '.join(files)}", file=sys.stderr, flush=True)
    if c == SAVE_FAILED_EXIT:  # the rank printed what failed and where; the launcher adds how to continue
        raise SaveFailed(f"a save by rank {r} of {n}", run_dir, run_dir, None, "its error is printed above")
    if c == 2:
        raise ConfigError(f"rank {r} of {n} stopped on the error printed above; the other ranks were stopped")
    message = first.error_file_data.get("message")
    if isinstance(message, dict):
        print(f"[rank {r}] {message['extraInfo']['py_callstack']}", end="", file=sys.stderr, flush=True)
    how = f"was killed by {first.signal_name()}" if c < 0 else f"exited with code {c}"
    raise RuntimeError(
        f"rank {r} of {n} {how} (its error is printed above, its output is in {RunDir(run_dir).rank_log(r)}); "
        "the other ranks were stopped"
    )


def _root_cause_order(f: ProcessFailure) -> tuple[int, float, int]:
    """A clear error first; then the first error file written (a rank that left none, killed by a signal: when the
    launcher saw it end); a rank stopped by a signal or closed by torch elastic last."""
    kind = 0 if f.exitcode in (2, SAVE_FAILED_EXIT) else 2 if f.exitcode in STOPPED or f.exitcode == CLOSED else 1
    # f.timestamp: whole seconds, taken when the launcher saw the rank end: up to a second late
    written = os.stat(f.error_file).st_mtime if os.path.isfile(f.error_file) else f.timestamp - 1.0
    return kind, written, f.local_rank


# ------------------------------------------------------------------------------------------------ one rank


def run_rank(
    run_dir: Path,
    resume_from: Path | None,
    started: float | None = None,
    prepared: Any = None,
    report: bool = False,
    on_error: Callable[[BaseException], None] | None = None,
) -> dict[str, Any]:
    """This rank's share of the run; the environment already says who it is (RANK, WORLD_SIZE, MASTER_*).

    `on_error` sees an error before the process group is destroyed: the other ranks fail on the lost connection only
    after this rank has reported why."""
    import torch

    from sft_exp.config.frozen import load_frozen
    from sft_exp.launch.distributed import destroy_process_group, init_process_group
    from sft_exp.run import execute

    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    init_process_group(load_frozen(run_dir))
    try:
        return execute(run_dir, started, resume_from=resume_from, prepared=prepared, report=report)
    except BaseException as e:
        if on_error is not None:
            on_error(e)
        raise
    finally:
        destroy_process_group()


def _exit_on_error(e: BaseException) -> None:
    """Record the error in this rank's error file, print it if it is a clear one, and exit at once with its code,
    before the process group is torn down. (A stop signal is no error: the ranks leave the usual way.)"""
    if isinstance(e, Interrupted) or not isinstance(e, Exception):
        return
    get_error_handler().record_exception(e)
    code = exit_code_of(e)
    if code is not None:
        print(f"[rank {os.environ.get('RANK', '0')}] error: {e}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 1)


def _die_with_launcher() -> None:
    """Get SIGKILL when the launcher dies (Linux), so a killed launcher leaves no orphans."""
    launcher = os.environ.get(LAUNCHER_PID)
    if not launcher:
        return
    with suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(launcher):  # it died before the prctl took effect
        os._exit(1)


@record
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog=f"python -m {RANK_MODULE}", description="one rank of a run (see the module doc)")
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--resume-from", type=Path, default=None)
    args = ap.parse_args(argv)
    if os.path.samestat(os.fstat(1), os.fstat(2)):  # torch opened the log once per stream: share one offset
        os.dup2(1, 2)
    _die_with_launcher()
    try:
        run_rank(args.run_dir, args.resume_from, on_error=_exit_on_error)
    except Interrupted as e:
        print(f"[rank {os.environ.get('RANK', '0')}] {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except Exception as e:  # before the process group existed
        _exit_on_error(e)


if __name__ == "__main__":
    main()
