"""mode=inspect: the highlighted spans are exactly the assistant turns (content + end-of-turn), on the terminal (ANSI
or ⟦ ⟧ brackets) and in inspect.html, with truncation by packing.max_length marked."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import pytest

from sft_exp.config import ASSETS, ConfigError, to_run_config, validate
from sft_exp.tools.inspect_view import CLOSE, CUT, GREEN, OPEN, RESET, collect, format_html, format_terminal
from tests.conftest import compose, launch

DEMO = ASSETS / "demo"
SOURCES = sorted(p.stem for p in DEMO.glob("*.jsonl"))
EOS = "<|im_end|>"


def first_rows(name: str, n: int) -> list[dict[str, Any]]:
    with (DEMO / f"{name}.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def expected_spans(row: dict[str, Any], train_on: str = "content") -> list[str]:
    """What must be highlighted, turn by turn (the smollm3 template strips leading newlines of assistant content)."""
    system = next((m["content"] for m in row["messages"] if m["role"] == "system"), "")
    no_think = "/no_think" in system or ("/think" not in system and not row["chat_template_kwargs"]["enable_thinking"])
    head = "<|im_start|>assistant\n" + ("<think>\n\n</think>\n" if no_think else "")
    return [
        (head if train_on == "content_and_header" else "") + m["content"].lstrip("\n") + EOS
        for m in row["messages"]
        if m["role"] == "assistant"
    ]


def bracketed(text: str) -> list[str]:
    return re.findall(re.escape(OPEN) + "(.*?)" + re.escape(CLOSE), text, flags=re.DOTALL)


@pytest.fixture(scope="module")
def tok() -> Any:
    from sft_exp.train.model import build_tokenizer

    return build_tokenizer(to_run_config(compose()))


@pytest.mark.parametrize("train_on", ["content", "content_and_header"])
def test_highlighted_spans_are_the_assistant_turns(tok: Any, train_on: str) -> None:
    run = to_run_config(compose(["inspect.n=4", f"template.train_on={train_on}"]))
    rows = collect(run, tok, SOURCES)
    assert [(r.source, r.row) for r in rows] == [(n, i) for n in SOURCES for i in range(4)]
    for r in rows:
        row = first_rows(r.source, 4)[r.row]
        assert r.trained_texts == expected_spans(row, train_on), (r.source, r.row)
        assert "".join(run_.text for run_ in r.runs).count(EOS) >= len(r.trained_texts)
    # brackets off a terminal: every row's bracketed spans, in order
    text = format_terminal(rows, color=False)
    assert bracketed(text) == [s for r in rows for s in r.trained_texts]
    assert "\x1b[" not in text
    # colour on a terminal: the same spans between the green code and the reset
    coloured = format_terminal(rows, color=True)
    spans = re.findall(re.escape(GREEN) + "(.*?)" + re.escape(RESET), coloured, flags=re.DOTALL)
    assert spans[1:] == [s for r in rows for s in r.trained_texts] and OPEN not in coloured  # [0]: the legend
    page = format_html(rows, "t", [])
    marks = [html.unescape(m) for m in re.findall("<mark>(.*?)</mark>", page, flags=re.DOTALL)]
    assert marks == [s for r in rows for s in r.trained_texts]


def test_truncation_is_marked(tok: Any) -> None:
    run = to_run_config(compose(["inspect.n=3", "packing.max_length=250"]))
    rows = collect(run, tok, ["tools"])  # tool rows are the longest (their tool list sits in the system turn)
    long = [r for r in rows if r.tokens > 250]
    assert long, "expected a tools row longer than 250 tokens"
    text = format_terminal(long, color=False)
    assert text.count(CUT) == len(long) + 1  # one per row, and the legend
    for r in long:
        cut = [x for x in r.runs if x.cut]
        assert cut and all(x.cut for x in r.runs[r.runs.index(cut[0]) :])  # everything after the cut is cut
        assert r.trained_texts == expected_spans(first_rows("tools", 3)[r.row])  # the mask itself is unchanged
    assert "<del>" in format_html(long, "t", []) and "class=cut" in format_html(long, "t", [])


def test_inspect_source_must_be_in_the_mixture() -> None:
    run = to_run_config(compose(["inspect.source=nope"]))
    with pytest.raises(ConfigError, match="inspect.source: 'nope' is not a source of the mixture"):
        validate(run)
    with pytest.raises(ConfigError, match="inspect.n: must be >= 1"):
        validate(to_run_config(compose(["inspect.n=0"])))


@pytest.mark.slow
def test_mode_inspect_end_to_end(tmp_path: Path, fast_args: list[str]) -> None:
    r = launch(["mode=inspect", "inspect.n=3", "inspect.source=tools", *fast_args], cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = [s for row in first_rows("tools", 3) for s in expected_spans(row)]
    assert bracketed(r.stdout) == expected  # stdout is a pipe here: brackets, no colour
    assert "template check: ok" in r.stdout and r.stdout.count("━━ tools · row") == 3
    page = (tmp_path / "run" / "inspect.html").read_text(encoding="utf-8")
    assert [html.unescape(m) for m in re.findall("<mark>(.*?)</mark>", page, flags=re.DOTALL)] == expected
    # nothing was tokenised, packed or trained
    for f in ("mixture_stats.json", "metrics.json", "model.safetensors"):
        assert not (tmp_path / "run" / f).exists(), f
