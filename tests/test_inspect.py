"""mode=inspect: the highlighted spans are exactly the assistant turns (content + end-of-turn), on the terminal (ANSI
or ⟦ ⟧ brackets) and in inspect.html, with truncation by packing.max_length marked."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
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


@dataclass
class Node:
    tag: str
    attrs: dict[str, str | None]
    children: list[Node | str] = field(default_factory=list)
    parent: Node | None = None

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    def find(self, tag: str, cls: str | None = None) -> list[Node]:
        out = []
        for c in self.children:
            if isinstance(c, Node):
                if c.tag == tag and (cls is None or cls in (c.attrs.get("class") or "").split()):
                    out.append(c)
                out += c.find(tag, cls)
        return out

    def ancestors(self) -> list[Node]:
        out, p = [], self.parent
        while p is not None:
            out.append(p)
            p = p.parent
        return out


VOID = {"meta", "br", "hr", "img", "input", "link"}


class TreeParser(HTMLParser):
    """inspect.html as a tree (html.parser: attributes unescaped, character references converted)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Node("root", {})

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, dict(attrs), parent=self.cur)
        self.cur.children.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_endtag(self, tag: str) -> None:
        assert self.cur.tag == tag, f"</{tag}> closes <{self.cur.tag}>"
        self.cur = self.cur.parent  # type: ignore[assignment]

    def handle_data(self, data: str) -> None:
        self.cur.children.append(data)


def parse(page: str) -> Node:
    p = TreeParser()
    p.feed(page)
    p.close()
    assert p.cur is p.root, "unclosed elements"
    return p.root


def tokens_of(row: Node) -> list[Node]:
    """The token spans of a row, in order."""
    return [n for n in row.find("span") if re.fullmatch(r"t[01]", n.attrs.get("class") or "")]


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
    tree = parse(page)
    marks = [m.text for m in tree.find("mark") if "legend" not in (m.attrs.get("class") or "")]
    assert marks == [s for r in rows for s in r.trained_texts]
    divs = tree.find("div", "row")
    assert len(divs) == len(rows)
    for div, r in zip(divs, rows):
        toks = tokens_of(div)
        # every token its own span with its id on hover, alternating shades; together they are the row's text
        assert "".join(t.text for t in toks) == "".join(x.text for x in r.runs)
        ids = [
            int(i) for t in toks for i in re.fullmatch(r"ids? ((?:\d+ ?)+)", t.attrs["title"] or "").group(1).split()
        ]
        assert len(ids) == r.tokens
        assert [t.attrs["class"] for t in toks] == [f"t{i % 2}" for i in range(len(toks))]
        assert sum(len(t.attrs["title"].split()) == 2 for t in toks) > 0.9 * len(toks)  # nearly all: one id each
        for m in div.find("mark"):
            assert all(isinstance(c, Node) and c.tag == "span" for c in m.children)


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
    tree = parse(format_html(long, "t", []))
    for div, r in zip(tree.find("div", "row"), long):
        (label,) = div.find("span", "cut")
        assert label.text == f"{CUT} cut at max_length (250 tokens)"
        grey = div.find("span", "cut-text")
        cut_runs = [x for x in r.runs if x.cut]
        assert "".join(g.text for g in grey) == "".join(x.text for x in cut_runs)
        assert all(g.attrs["title"] == "cut at max_length: not trained" for g in grey)
        # never highlighted as trained: no cut text inside or holding a <mark>, though its mask says trained
        assert any(x.trained for x in cut_runs), "expected an assistant turn beyond the cut"
        assert all(not g.find("mark") and all(a.tag != "mark" for a in g.ancestors()) for g in grey)
        # everything after the label is grey
        after = div.children[div.children.index(label) + 1 :]
        assert after and all(isinstance(c, Node) and "cut-text" in c.attrs["class"] for c in after)
        assert sum(len(t.attrs["title"].split()) - 1 for t in tokens_of(div)) == r.tokens
    assert not tree.find("del")


def test_a_repeated_system_prompt_is_collapsed(tok: Any) -> None:
    run = to_run_config(compose(["inspect.n=3"]))
    rows = collect(run, tok, ["arith", "reverse"])
    tree = parse(format_html(rows, "t", []))
    divs = tree.find("div", "row")
    seen: dict[str, int] = {}
    for div, r in zip(divs, rows):
        details = div.find("details", "system")
        head = "".join(x.text for x in r.runs if x.head)
        assert head.startswith("<|im_start|>system") and head.rstrip().endswith(EOS)
        assert len(details) == 1 and div.children[0] is details[0]  # the row opens with it
        (d,) = details
        summary = d.find("summary")[0]
        assert d.text.removeprefix(summary.text) == head  # in full, token by token, untrained
        assert tokens_of(d) and not d.find("mark")
        if head in seen:
            assert "open" not in d.attrs and "collapsed" in summary.text and "the same as" in summary.text
        else:
            assert "open" in d.attrs and "collapsed" not in summary.text
        seen[head] = seen.get(head, 0) + 1
    assert max(seen.values()) >= 2, "expected rows sharing a system prompt"
    # the row's text without the system turn: the rest of the row, marks included
    for div, r in zip(divs, rows):
        rest = "".join(x.text for x in r.runs if not x.head)
        assert "".join(t.text for t in tokens_of(div) if all(a.tag != "details" for a in t.ancestors())) == rest


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
    marks = [m.text for m in parse(page).find("mark") if "legend" not in (m.attrs.get("class") or "")]
    assert marks == expected
    # nothing was tokenised, packed or trained
    for f in ("mixture_stats.json", "metrics.json", "model.safetensors"):
        assert not (tmp_path / "run" / f).exists(), f
