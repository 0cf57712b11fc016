"""Sources: every local format through the real datasets calls, and broken rows named by source and row index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft_exp.config import SourceConfig
from sft_exp.data.sources import load_source, row_problem
from sft_exp.errors import DataError

ROWS = [
    {
        "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
        "chat_template_kwargs": {"enable_thinking": bool(i % 2)},
    }
    for i in range(12)
]


def _write(path: Path, fmt: str, rows: list[dict]) -> Path:
    import datasets

    ds = datasets.Dataset.from_list(rows)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    elif fmt == "saved":
        ds.save_to_disk(str(path))
    elif fmt == "arrow":
        import pyarrow as pa

        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, ds.data.table.schema) as w:
            w.write_table(ds.data.table)
    return path


@pytest.mark.parametrize(
    "fmt,name",
    [("jsonl", "x.jsonl"), ("json", "x.json"), ("parquet", "x.parquet"), ("arrow", "x.arrow"), ("saved", "saved")],
)
def test_local_formats_load(tmp_path: Path, fmt: str, name: str) -> None:
    path = _write(tmp_path / name, fmt, ROWS)
    ds = load_source("s", SourceConfig(path=str(path)))
    assert len(ds) == 12 and ds.column_names == ["messages", "chat_template_kwargs"]
    assert ds[3]["messages"][1]["content"] == "a3"


def test_a_folder_of_files_and_column_selection(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    _write(tmp_path / "d" / "a.jsonl", "jsonl", ROWS[:5])
    _write(tmp_path / "d" / "b.jsonl", "jsonl", ROWS[5:])
    ds = load_source("s", SourceConfig(path=str(tmp_path / "d"), columns=["messages"]))
    assert len(ds) == 12 and ds.column_names == ["messages"]


def test_missing_columns_and_messages_are_named(tmp_path: Path) -> None:
    p = _write(tmp_path / "x.jsonl", "jsonl", ROWS)
    with pytest.raises(DataError, match=r"mixture.sources.s: columns \['nope'\] not found"):
        load_source("s", SourceConfig(path=str(p), columns=["messages", "nope"]))
    q = tmp_path / "y.jsonl"
    q.write_text('{"text": "hello"}\n')
    with pytest.raises(DataError, match=r"mixture.sources.s: no known data format in columns \['text'\]"):
        load_source("s", SourceConfig(path=str(q)))
    with pytest.raises(DataError, match=r"mixture.sources.s: no column \['messages'\] for format=messages") as e:
        load_source("s", SourceConfig(path=str(q), format="messages"))
    assert "a 'messages' list of {role, content} turns" in str(e.value)


@pytest.mark.parametrize(
    "messages,problem",
    [
        ([{"role": "user", "content": "q"}], "no assistant turn"),
        ([{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}], "unknown role 'robot'"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], "empty assistant turn"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}], "content is int, not a string"),
        ([], "messages is empty"),
    ],
)
def test_row_problems(messages: list, problem: str) -> None:
    assert problem in row_problem(messages)


def test_bad_rows_error_names_the_row_or_are_dropped_and_counted(tmp_path: Path) -> None:
    from sft_exp.config import BadRows, to_run_config
    from sft_exp.data.pipeline import tokenize_source
    from sft_exp.data.template import RenderSpec
    from sft_exp.train.model import build_tokenizer
    from tests.conftest import compose

    rows = [dict(r) for r in ROWS]
    rows[7] = {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}],
        "chat_template_kwargs": {"enable_thinking": False},
    }
    path = _write(tmp_path / "bad.jsonl", "jsonl", rows)
    run = to_run_config(compose([f"mixture.sources.arith.path={path}"]))
    tok = build_tokenizer(run)
    spec = RenderSpec.build(run.template, tok)
    with pytest.raises(DataError, match="mixture.sources.arith: row 7 is not a valid conversation: turn 1 is an empty"):
        tokenize_source("arith", run, spec, tok, tmp_path / "cache")
    run.mixture.on_bad_rows = BadRows.drop
    src = tokenize_source("arith", run, spec, tok, tmp_path / "cache")
    assert src.rows_in_source == 12 and src.rows_dropped == 1 and len(src.lengths) == 11
