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

A save that fails (disk full, quota, permission denied, read-only filesystem, ...) raises `SaveFailed` naming what
was being saved, where, the error (errno), the fix, and the last complete checkpoint `resume=<run dir>` continues
from; the process exits with SAVE_FAILED_EXIT. The half-written checkpoint gets no marker, rotation never runs
for it, and nothing already in the run directory is deleted. torch.save and safetensors report a full disk as
RuntimeError / SafetensorError rather than OSError: those are recognised too (`save_guard`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sft_exp.errors import StorageError
from sft_exp.rundir import RunDir, resume_arg

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
            try:
                shutil.rmtree(p)
            except OSError as e:  # an older checkpoint stays; training goes on, but nobody is left wondering why
                print(f"[sft-exp] warning: could not delete {p.name} (save_total_limit): {e}", file=sys.stderr)


def _step(p: Path) -> int:
    return int(p.name.rsplit("-", 1)[1])


# ----------------------------------------------------------------------------------------------- a save that fails

_FIX = {
    errno.ENOSPC: "free space on that filesystem",
    errno.EDQUOT: "free space within your disk quota (or raise it)",
    errno.EACCES: "make the run directory and its files writable by this user",
    errno.EPERM: "make the run directory and its files writable by this user",
    errno.EROFS: "remount that filesystem read-write (or move the run directory to a writable one)",
    errno.EFBIG: "raise the file size limit (ulimit -f) or use a filesystem that allows larger files",
    errno.EIO: "check the disk and the filesystem (dmesg); the storage reported an I/O error",
}
# How torch.save (its C++ zip writer) and safetensors report a failed write: not as OSError, and torch without errno.
_WRITE_ERROR_TEXT = re.compile(
    r"unexpected pos \d+ vs \d+|file write failed|PytorchStreamWriter failed|open file failed|I/O error|os error \d+",
    re.I,
)
_ERRNO_IN_TEXT = re.compile(r"os error (\d+)|errno[ =:]*(\d+)", re.I)
_LOW_SPACE = 16 << 20  # bytes: after a failed write with less than this left, a full disk is the likely cause


class SaveFailed(StorageError):
    """Writing `what` (checkpoint-N save, final model save, metrics.json write, ...) into the run directory failed.

    `error` is the underlying exception (kept as __cause__ too); `code` its errno when known (for torch/safetensors
    errors: read from the message or, failing that, diagnosed from the filesystem). `command` is the command that
    continues the run (the launcher fills it in; without it the message says to add resume=<run dir>)."""

    def __init__(self, what: str, path: Path, run_dir: Path, code: int | None, error: BaseException | str) -> None:
        self.what, self.path, self.run_dir, self.code, self.error = what, Path(path), Path(run_dir), code, error
        self.last_complete = last_complete_checkpoint(self.run_dir)
        self.command: str | None = None
        super().__init__(what, str(path), code)

    def __str__(self) -> str:
        if self.code:
            reason = f"{os.strerror(self.code)} ({errno.errorcode.get(self.code, self.code)})"
            if not isinstance(self.error, OSError):  # torch / safetensors: what they said, too
                reason = f"{reason[:-1]}; {_short(self.error, 120)})"
            fix = _FIX.get(self.code, "fix the storage problem")
        else:
            reason = self.error if isinstance(self.error, str) else f"a write failed ({_short(self.error)})"
            fix = "fix the storage problem (free space? permissions? quota?)"
        lines = [f"{self.what} failed: {reason}: {self.path}"]
        half = next((q for q in (self.path, *self.path.parents) if _CKPT.match(q.name)), None)
        if half is not None and half.is_dir() and not is_complete(half):
            fix += f"; {half.name} is incomplete (never marked complete: resume removes it)"
        lines.append(f"fix: {fix}")
        if not RunDir(self.run_dir).is_run():
            lines.append("then run the command again (nothing was trained yet)")
        else:
            frm = (
                f"from {self.last_complete.name}, its last complete checkpoint"
                if self.last_complete
                else "from the start, in the same directory (no complete checkpoint yet)"
            )
            how = self.command or f"the same command with {resume_arg(self.run_dir)}"
            lines.append(f"then continue the run {frm}: {how}")
        return "\n  ".join(lines)


def _short(error: BaseException | str, limit: int = 200) -> str:
    text = " ".join(str(error).split()) if not isinstance(error, str) else error
    text = f"{type(error).__name__}: {text}" if isinstance(error, BaseException) else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _diagnose(path: Path) -> int | None:
    """The likely errno behind a write failure that came without one: a full, read-only or unwritable filesystem."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if st.f_bavail * st.f_frsize < _LOW_SPACE or (st.f_files and st.f_favail == 0):
        return errno.ENOSPC
    if not os.access(p if p.is_dir() else p.parent, os.W_OK):
        return errno.EACCES
    return None


def _storage_errno(e: BaseException, path: Path) -> int | None:
    if isinstance(e, OSError) and e.errno:
        return e.errno
    m = _ERRNO_IN_TEXT.search(str(e))
    if m:
        return int(m.group(1) or m.group(2))
    return _diagnose(path)


@contextmanager
def save_guard(what: str, path: Path, run_dir: Path) -> Iterator[None]:
    """Turn a failed write inside the block into SaveFailed(what, ...). Other errors (bugs) keep their traceback."""
    try:
        yield
    except SaveFailed:
        raise
    except Exception as e:
        code = _storage_errno(e, path)
        if not isinstance(e, OSError) and code is None and not _WRITE_ERROR_TEXT.search(str(e)):
            raise
        where = Path(e.filename) if isinstance(e, OSError) and isinstance(e.filename, (str, os.PathLike)) else path
        raise SaveFailed(what, where, run_dir, code, e) from e
