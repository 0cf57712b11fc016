"""Data formats (sft_exp.data.formats): each format -> the internal conversation form, known-good outputs; detection;
rows that do not fit named by source, row and field (or dropped and counted); the conversion in the cache key; and
one end-to-end run (prepare + a few training steps) of a mixture that combines every format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft_exp.config import SourceConfig
from sft_exp.data.formats import detect_format, to_messages
from sft_exp.data.sources import fingerprint, load_source, row_problem
from sft_exp.errors import ConfigError, DataError
from tests.conftest import launch

U, A = "user", "assistant"


def turn(role: str, content: str, **extra: object) -> dict:
    return {"role": role, "content": content, **extra}


FORMAT_ROWS = {
    "messages": {"messages": [turn(U, "q"), turn(A, "a")]},
    "sharegpt": {
        "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
        "system": "be brief",
    },
    "alpaca": {"instruction": "Add", "input": "2+2", "output": "4", "system": ""},
    "prompt_completion": {"prompt": "2+2?", "completion": "4"},
}
EXPECTED = {
    "messages": [turn(U, "q"), turn(A, "a")],
    "sharegpt": [turn("system", "be brief"), turn(U, "q"), turn(A, "a")],
    "alpaca": [turn(U, "Add\n\n2+2"), turn(A, "4")],
    "prompt_completion": [turn(U, "2+2?", train=False), turn(A, "4", train=True)],
}


@pytest.mark.parametrize("fmt", list(FORMAT_ROWS))
def test_each_format_converts_to_known_messages(fmt: str) -> None:
    row = FORMAT_ROWS[fmt]
    assert detect_format(list(row)) == fmt
    assert to_messages(row, fmt) == (EXPECTED[fmt], None)


def test_conversational_prompt_completion_trains_the_completion_only() -> None:
    row = {"prompt": [turn(U, "a"), turn(A, "b"), turn(U, "c")], "completion": [turn(A, "d")]}
    msgs, problem = to_messages(row, "prompt_completion")
    assert problem is None
    assert [m["train"] for m in msgs] == [False, False, False, True]


def test_field_and_role_mapping() -> None:
    row = {"chat": [{"speaker": "human", "text": "q"}, {"speaker": "bot", "text": "a"}]}
    fields = {"messages": "chat", "role": "speaker", "content": "text"}
    assert detect_format(list(row), fields=fields) == "messages"
    assert to_messages(row, "messages", fields, {"human": "user", "bot": "assistant"}) == (EXPECTED["messages"], None)
    # a `conversations` column of role/content turns is messages under another name, not sharegpt
    import datasets

    ds = datasets.Dataset.from_list([{"conversations": [turn(U, "q"), turn(A, "a")]}])
    assert detect_format(ds.column_names, ds.features) == "messages"


@pytest.mark.parametrize(
    ("fmt", "row", "needle"),
    [
        ("alpaca", {"instruction": "x", "output": 4}, "field 'output' is int, not a string"),
        ("sharegpt", {"conversations": [{"from": "robot", "value": "x"}]}, "field conversations[0].from: unknown role"),
        ("prompt_completion", {"prompt": "x", "completion": [turn(A, "y")]}, "mix a string and a list"),
        ("messages", {"messages": []}, "field 'messages' is empty"),
    ],
)
def test_a_row_that_does_not_fit_names_the_field(fmt: str, row: dict, needle: str) -> None:
    msgs, problem = to_messages(row, fmt)
    assert msgs is None and needle in str(problem)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_rows_reach_the_data_stage_named_and_droppable(tmp_path: Path) -> None:
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(4)] + [{"instruction": "q", "output": None}]
    ds, fmt = load_source("alp", SourceConfig(path=str(_jsonl(tmp_path / "a.jsonl", rows))), with_format=True)
    assert fmt == "alpaca" and ds.column_names == ["messages"]
    problems = [row_problem(m) for m in ds["messages"]]
    assert problems[:4] == [None] * 4 and problems[4] == "field 'output' is NoneType, not a string"


def test_missing_columns_and_bad_mappings_are_clear(tmp_path: Path) -> None:
    path = str(_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}]))
    with pytest.raises(DataError, match=r"mixture.sources.x: no known data format in columns \['answer', 'question'\]"):
        load_source("x", SourceConfig(path=path))
    with pytest.raises(DataError) as e:
        load_source("x", SourceConfig(path=path, format="messages"))
    assert "{role, content}" in str(e.value) and "{{" not in str(e.value)
    with pytest.raises(ConfigError, match="roles: 'bot' maps to 'robot'"):
        load_source("x", SourceConfig(path=path, roles={"bot": "robot"}))
    ok = SourceConfig(path=path, format="alpaca", fields={"instruction": "question", "output": "answer"})
    assert load_source("x", ok)["messages"] == [[turn(U, "q"), turn(A, "a")]]


def test_the_conversion_is_part_of_the_cache_key(tmp_path: Path) -> None:
    path = str(_jsonl(tmp_path / "x.jsonl", [FORMAT_ROWS["alpaca"]]))
    keys = {
        fingerprint(SourceConfig(path=path)),
        fingerprint(SourceConfig(path=path, format="alpaca")),
        fingerprint(SourceConfig(path=path, format="alpaca", fields={"input": "context"})),
        fingerprint(SourceConfig(path=path, roles={"bot": "assistant"})),
    }
    assert len(keys) == 4


def test_a_mixture_of_every_format_trains_end_to_end(tmp_path: Path, fast_args: list[str]) -> None:
    """One run: the demo mixture's six sources pointed at files of every format (prepare + training steps)."""
    n = 24
    files = {
        "arith": [{"instruction": f"Add {i} and {i}", "input": "", "output": str(2 * i)} for i in range(n)],
        "count": [
            {"conversations": [{"from": "human", "value": f"count to {i}"}, {"from": "gpt", "value": str(i)}]}
            for i in range(n)
        ],
        "reverse": [{"prompt": f"reverse ab{i}", "completion": f"{i}ba"} for i in range(n)],
        "sort": [
            {
                "prompt": [turn(U, f"sort {i} 1"), turn(A, f"1 {i}"), turn(U, "again")],
                "completion": [turn(A, f"1 {i}")],
            }
            for i in range(n)
        ],
        "tools": [
            {"chat": [{"speaker": "human", "text": f"hi {i}"}, {"speaker": "bot", "text": "hello"}]} for i in range(n)
        ],
        "units": [{"messages": [turn(U, f"{i} m in cm"), turn(A, f"{100 * i} cm")]} for i in range(n)],
    }
    args = [*fast_args, "mixture.test_split_size=4", "train.max_steps=2", "eval_before_train=false"]
    for name, rows in files.items():
        args.append(f"mixture.sources.{name}.path={_jsonl(tmp_path / f'{name}.jsonl', rows)}")
    args += [
        # new keys of a mapping take Hydra's + (a mixture YAML writes `fields: {messages: chat, ...}`)
        "+mixture.sources.tools.fields.messages=chat",
        "+mixture.sources.tools.fields.role=speaker",
        "+mixture.sources.tools.fields.content=text",
        "+mixture.sources.tools.roles.bot=assistant",
        "+mixture.sources.tools.roles.human=user",
    ]
    r = launch(args, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads((tmp_path / "run/mixture_stats.json").read_text())
    formats = {k: v["format"] for k, v in stats["sources"].items()}
    assert formats == {
        "arith": "alpaca",
        "count": "sharegpt",
        "reverse": "prompt_completion",
        "sort": "prompt_completion",
        "tools": "messages",
        "units": "messages",
    }
    assert all(s["trained_tokens"] > 0 and s["rows_dropped"] == 0 for s in stats["sources"].values())
    assert "sharegpt" in r.stdout  # the mixture table shows each source's format
    assert (tmp_path / "run/metrics.json").exists()


@pytest.mark.parametrize("name", ["sft_exp.data.formats", "sft_exp.data.sources", "sft_exp.lock"])
def test_docstring_examples_run(name: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, result
