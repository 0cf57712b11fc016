"""One exception hierarchy for what a user can fix; each error carries the exit code the process ends with.

    SftExpError (2)            what the user must change: the message says what, where and how to fix it
      ConfigError (2)          a key of the config (or the machine it asks for)
      DataError (2)            a source's rows or files
      TemplateError (2)        a chat template that cannot give a trustworthy mask
    StorageError (74)          a write into the run directory failed (sysexits' EX_IOERR): the storage needs fixing
    Interrupted (128 + n)      stopped on signal n after saving a checkpoint

The in-process run, each local rank and each Slurm task turn these into the same `error: <message>` line and exit
code (`exit_code_of`); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import signal
from pathlib import Path

SAVE_FAILED_EXIT = 74


class SftExpError(Exception):
    """Base: a problem the message explains in full; no traceback is shown for it."""

    exit_code: int = 2


class ConfigError(SftExpError, ValueError):
    """A configuration problem found before anything heavy runs; the message says what, where and how to fix."""


class DataError(SftExpError, ValueError):
    """Bad data in a source: the message names the source, the row and how to fix it."""


class TemplateError(SftExpError, ValueError):
    """The chat template cannot give a trustworthy mask (or is missing where one is needed)."""


class StorageError(SftExpError):
    """A write into the run directory failed; sft_exp.checkpoints.SaveFailed says what, where and how to go on."""

    exit_code = SAVE_FAILED_EXIT


class Interrupted(SftExpError):
    """Training stopped on a signal after saving `checkpoint`; the exit code is 128 + the signal."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        where = f"saved {checkpoint}" if checkpoint else "no checkpoint could be saved"
        super().__init__(f"interrupted by {name} at step {step}: {where}")

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return 128 + self.signum


def exit_code_of(e: BaseException) -> int | None:
    """The exit code of an error reported as one `error:` line (None: a bug, whose traceback is the report).

    A missing file given by the user (a source, a model folder) counts as a config error."""
    if isinstance(e, SftExpError):
        return e.exit_code
    if isinstance(e, FileNotFoundError):
        return 2
    return None
