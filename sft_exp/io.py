"""Atomic JSON writes into the run directory (a failed write raises SaveFailed, never leaves half a file)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from sft_exp.checkpoints import SaveFailed


def write_json(path: Path, obj: Any) -> None:
    """Write then rename, so a reader (or a crash) never sees half a file. A failed write (disk full, permissions)
    raises SaveFailed naming the file; `path` keeps its previous content."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):  # only our own half-written temporary file
            tmp.unlink(missing_ok=True)
        raise SaveFailed(f"{path.name} write", path, path.parent, e.errno, e) from e


def read_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable (a run directory still being written)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
