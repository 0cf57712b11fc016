"""One source (a hub dataset id or local data) -> a `datasets.Dataset` of conversations, with row validation.

Loading goes through the real `datasets.load_dataset` / `load_from_disk`, so hub ids work for users; local files are
read through the same calls (the "json"/"parquet"/"arrow" builders), which memory-map Arrow instead of holding a
split in RAM.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
from typing import Any

import datasets

from sft_exp.config import ConfigError, SourceConfig
from sft_exp.data import formats
from sft_exp.errors import DataError

VALID_ROLES = formats.VALID_ROLES
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
    fmt = spec.format.value if hasattr(spec.format, "value") else str(spec.format)
    mapping = {"format": fmt, "fields": dict(spec.fields or {}), "roles": dict(spec.roles or {})}
    h.update(json.dumps([formats.FORMATS_VERSION, mapping], sort_keys=True).encode())
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


def check_utf8(files: list[str], where: str, chunk: int = 1 << 24) -> None:
    """Raise DataError naming the file, line and byte of the first invalid UTF-8 in text data files (Arrow would
    load them and fail later, row by row, with a bare UnicodeDecodeError). One sequential read, O(chunk) memory."""
    for path in files:
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = lines = 0
        with open(path, "rb") as f:
            while block := f.read(chunk):
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as e:
                    line = lines + block.count(b"\n", 0, e.start) + 1
                    raise DataError(
                        f"{where}: {path} line {line} is not valid UTF-8 ({e.reason} at byte {offset + e.start}). "
                        "Re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8), or drop that line"
                    ) from None
                offset, lines = offset + len(block), lines + block.count(b"\n")
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: {path} ends inside a UTF-8 character ({e.reason}). Re-encode it") from None


def load_source(name: str, spec: SourceConfig, with_format: bool = False) -> Any:
    """Load one source as a `datasets.Dataset` of conversations in the internal form (see `to_conversations`),
    restricted to its columns; with_format=True returns (dataset, the format it was read as). Raises
    DataError/ConfigError clearly.

    Example:
        >>> ds, fmt = load_source("chat", SourceConfig(path="data/sharegpt.jsonl"), with_format=True)  # doctest: +SKIP
        >>> fmt, ds.column_names  # doctest: +SKIP
        ('sharegpt', ['messages'])
    """
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
                if builder in ("json", "csv", "text"):
                    check_utf8(files, where)
                ds = datasets.load_dataset(builder, data_files=files, split="train")
        else:
            ds = datasets.load_dataset(spec.id, spec.config, split=spec.split, revision=spec.revision)
    except (ConfigError, DataError):
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the source named
        what = spec.path or f"{spec.id} (config={spec.config}, split={spec.split})"
        raise DataError(f"{where}: could not load {what}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e

    out = to_conversations(name, spec, ds)
    return (out, source_format(name, spec, ds)) if with_format else out


def source_format(name: str, spec: SourceConfig, ds: Any) -> str:
    """The format of a loaded source: `spec.format`, or the one its columns show when it is `auto`.

    Example:
        >>> ds = datasets.Dataset.from_list([{"prompt": "2+2?", "completion": "4"}])
        >>> source_format("math", SourceConfig(path="math.jsonl"), ds)
        'prompt_completion'
    """
    where = f"mixture.sources.{name}"
    problem = formats.check_mapping(spec.fields, spec.roles)
    if problem:
        raise ConfigError(f"{where}.{problem}")
    fmt = spec.format.value if hasattr(spec.format, "value") else str(spec.format)
    if fmt == "auto":
        try:
            return formats.detect_format(ds.column_names, ds.features, spec.fields)
        except ValueError as e:
            raise DataError(f"{where}: {e}. Set {where}.format and, for other column names, {where}.fields") from e
    return fmt


def to_conversations(name: str, spec: SourceConfig, ds: Any) -> Any:
    """A loaded source in the internal form: a `messages` column of {role, content} turns (+ chat_template_kwargs
    when the source has it, + the `columns` kept). A row that does not fit its format gets a stand-in conversation
    that `row_problem` reports (naming the field), so the data stage raises or drops and counts it."""
    where = f"mixture.sources.{name}"
    fmt = source_format(name, spec, ds)
    cols = ds.column_names
    need = (
        [formats.messages_column(fmt, cols, spec.fields)]
        if fmt == "messages"
        else formats.required_columns(fmt, spec.fields)
    )
    absent = [c for c in need if c not in cols]
    if absent:
        raise DataError(
            f"{where}: no column {absent} for format={fmt} (columns: {cols}). sft-exp trains on conversations: "
            "a 'messages' list of {role, content} turns, or another format (mixture.sources.<name>.format: "
            f"{', '.join(formats.FORMATS)}) with its columns renamed by {where}.fields"
        )
    kw = spec.fields.get("chat_template_kwargs", "chat_template_kwargs") if spec.fields else "chat_template_kwargs"
    plain = fmt == "messages" and need == ["messages"] and not spec.roles and kw == "chat_template_kwargs"
    if plain:  # the internal form already: no conversion pass
        wanted = list(spec.columns) if spec.columns else [c for c in DEFAULT_COLUMNS if c in cols]
        missing = [c for c in wanted if c not in cols]
        if missing:
            raise DataError(f"{where}: columns {missing} not found (columns: {cols})")
        return ds.select_columns(wanted)
    keep = [c for c in (spec.columns or []) if c in cols and c not in need and c not in ("messages", kw)]
    fields, roles = dict(spec.fields or {}), dict(spec.roles or {})
    optional = [
        c for c in (fields.get("system", "system"), fields.get("input", "input")) if c in cols and c not in need
    ]

    def convert(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        n = len(next(iter(batch.values())))
        out: list[Any] = []
        for i in range(n):
            msgs, problem = formats.to_messages({c: batch[c][i] for c in need + optional}, fmt, fields, roles)
            out.append(msgs if msgs is not None else formats.bad_row(str(problem)))
        res: dict[str, list[Any]] = {"messages": out}
        if kw in batch:
            res["chat_template_kwargs"] = batch[kw]
        return res

    drop = [c for c in cols if c not in keep]
    return ds.map(convert, batched=True, remove_columns=drop, desc=f"convert {name} ({fmt})")


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Drop keys whose value is None (Arrow fills missing struct keys with None), as apply_chat_template does."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def row_problem(messages: Any) -> str | None:
    """Why a row is not a valid conversation, or None when it is (a row that did not fit its format: why not)."""
    if not isinstance(messages, list) or not messages:
        return "messages is empty or not a list"
    if isinstance(messages[0], dict) and messages[0].get("role") == formats.BAD_ROW_ROLE:
        return str(messages[0].get("content"))
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
