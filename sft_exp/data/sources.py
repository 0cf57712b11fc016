"""One source (a hub dataset id or local data) -> a `datasets.Dataset` of conversations, with row validation.

Loading goes through the real `datasets.load_dataset` / `load_from_disk`, so hub ids work for users; local files are
read through the same calls (the "json"/"parquet"/"arrow" builders), which memory-map Arrow instead of holding a
split in RAM.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Any

import datasets

from sft_exp.config import ConfigError, SourceConfig
from sft_exp.errors import DataError

VALID_ROLES = frozenset({"system", "user", "assistant", "tool"})
DEFAULT_COLUMNS = ("messages", "chat_template_kwargs")
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


def _local_files(path: str) -> tuple[str, list[str]]:
    """(builder, files) for a local file or a folder of files of one format."""
    if os.path.isdir(path):
        files = sorted(f for ext in _BUILDERS for f in glob.glob(os.path.join(path, f"**/*{ext}"), recursive=True))
        exts = {os.path.splitext(f)[1] for f in files}
        builders = {_BUILDERS[e] for e in exts}
        if not files:
            raise ConfigError(f"{path}: no .jsonl/.json/.parquet/.arrow files in this folder")
        if len(builders) > 1:
            raise ConfigError(f"{path}: mixes file formats {sorted(exts)}; keep one format per source folder")
        return builders.pop(), files
    ext = os.path.splitext(path)[1]
    if ext not in _BUILDERS:
        raise ConfigError(f"{path}: unsupported file type '{ext}'; use .jsonl, .json, .parquet or .arrow")
    return _BUILDERS[ext], [path]


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and (
        os.path.exists(os.path.join(path, "state.json")) or os.path.exists(os.path.join(path, "dataset_dict.json"))
    )


def fingerprint(spec: SourceConfig) -> str:
    """What identifies a source's content: the files' size and mtime for local data, the id+revision for hub data."""
    h = hashlib.sha256()
    h.update(json.dumps({k: getattr(spec, k) for k in ("id", "path", "config", "split", "revision")}).encode())
    h.update(json.dumps(sorted(spec.columns) if spec.columns else None).encode())
    if spec.path is not None:
        files = (
            sorted(glob.glob(os.path.join(spec.path, "**/*"), recursive=True))
            if os.path.isdir(spec.path)
            else [spec.path]
        )
        for f in files:
            if os.path.isfile(f):
                st = os.stat(f)
                h.update(
                    f"{os.path.relpath(f, spec.path) if f != spec.path else ''}:{st.st_size}:{st.st_mtime_ns}".encode()
                )
    return h.hexdigest()[:16]


def load_source(name: str, spec: SourceConfig) -> Any:
    """Load one source as a `datasets.Dataset` restricted to its columns. Raises DataError/ConfigError clearly."""
    where = f"mixture.sources.{name}"
    try:
        if spec.path is not None:
            if _is_saved_dataset(spec.path):
                ds = datasets.load_from_disk(spec.path)
                if isinstance(ds, datasets.DatasetDict):
                    if spec.split not in ds:
                        raise ConfigError(f"{where}: split '{spec.split}' not in {list(ds)} at {spec.path}")
                    ds = ds[spec.split]
            else:
                if spec.split != "train":  # datasets would silently read the files as 'train'
                    raise ConfigError(
                        f"{where}.split: '{spec.split}' for local files at {spec.path}, which are read as one split "
                        "('train'). Point path at that split's file(s) and drop the split override"
                    )
                builder, files = _local_files(spec.path)
                ds = datasets.load_dataset(builder, data_files=files, split="train")
        else:
            ds = datasets.load_dataset(spec.id, spec.config, split=spec.split, revision=spec.revision)
    except (ConfigError, DataError):
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the source named
        what = spec.path or f"{spec.id} (config={spec.config}, split={spec.split})"
        raise DataError(f"{where}: could not load {what}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e

    wanted = list(spec.columns) if spec.columns else [c for c in DEFAULT_COLUMNS if c in ds.column_names]
    missing = [c for c in wanted if c not in ds.column_names]
    if "messages" not in ds.column_names:
        raise DataError(
            f"{where}: no 'messages' column (columns: {ds.column_names}). sft-exp trains on conversations: "
            "a 'messages' list of {{role, content}} turns"
        )
    if missing:
        raise DataError(f"{where}: columns {missing} not found (columns: {ds.column_names})")
    return ds.select_columns(wanted)


def check_same_columns(columns_by_source: dict[str, list[str]]) -> None:
    """Columns that differ across sources are an error naming the sources and columns."""
    cols = {name: tuple(sorted(c)) for name, c in columns_by_source.items()}
    if len(set(cols.values())) > 1:
        lines = "; ".join(f"{n}: {list(c)}" for n, c in sorted(cols.items()))
        raise DataError(
            f"mixture.sources: columns differ across sources ({lines}). "
            "Set mixture.sources.<name>.columns to the same list for every source"
        )


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Drop keys whose value is None (Arrow fills missing struct keys with None), as apply_chat_template does."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def row_problem(messages: Any) -> str | None:
    """Why a row is not a valid conversation, or None when it is."""
    if not isinstance(messages, list) or not messages:
        return "messages is empty or not a list"
    n_assistant = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"turn {i} is not a mapping"
        role, content = m.get("role"), m.get("content")
        if role not in VALID_ROLES:
            return f"turn {i} has unknown role {role!r} (valid: {sorted(VALID_ROLES)})"
        if not isinstance(content, str):
            return f"turn {i} ({role}) content is {type(content).__name__}, not a string"
        if role == "assistant":
            n_assistant += 1
            if not content.strip():
                return f"turn {i} is an empty assistant turn"
    if n_assistant == 0:
        return "no assistant turn (nothing to train on)"
    return None
