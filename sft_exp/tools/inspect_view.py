"""mode=inspect: show rendered rows with the tokens that carry loss highlighted, so the mask can be seen.

    python launch.py mode=inspect                         # the first 3 rows of every source
    python launch.py mode=inspect inspect.source=tools inspect.n=5

Rows go through exactly the data stage's code (render + tokenise + mask + template.train_on), and the template check
runs on the shown sources (its problems are printed, not raised: inspecting a broken mask is the point). Each row is
printed as its text split into runs of trained / untrained tokens, each run decoded from its own token ids (so the
output is what the model reads, special tokens included):

* on a terminal, trained runs are bold green (NO_COLOR turns colour off);
* otherwise (a pipe, a log file) trained runs are wrapped in ⟦ ⟧;
* where packing.max_length truncates a row (overflow=truncate), the cut is marked ✂ and what follows is dimmed.

The same view is written to <run_dir>/inspect.html: trained runs in <mark>; every token its own <span title="id N">
(alternating backgrounds show the token boundaries, the id shows on hover); text cut by packing.max_length grey after
a "cut at max_length" label, never marked as trained; a system turn repeated across rows shown in full once (an open
<details>) and collapsed (a closed <details>, expandable) in the rows after.
"""

from __future__ import annotations

import html
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sft_exp.config import RunConfig
from sft_exp.data.pipeline import packing_choice
from sft_exp.data.sources import load_source, row_problem
from sft_exp.data.template import RenderSpec, encode_conversations, row_kwargs
from sft_exp.data.template_check import check_template
from sft_exp.train.model import build_tokenizer

OPEN, CLOSE, CUT = "⟦", "⟧", "✂"
GREEN, DIM, RESET = "\x1b[1;32m", "\x1b[2m", "\x1b[0m"


@dataclass
class Run:
    """A maximal run of tokens with the same (trained, cut, head) state, decoded; `tokens`: its text token by token
    (a piece of text and its ids: one id, or the few whose bytes make up one character)."""

    text: str
    trained: bool
    cut: bool = False
    tokens: list[tuple[str, list[int]]] = field(default_factory=list)
    head: bool = False  # part of the row's leading system turn


@dataclass
class ShownRow:
    source: str
    row: int
    tokens: int
    trained: int
    think: str
    runs: list[Run]
    cut_at: int | None = None  # packing.max_length when it truncates this row

    @property
    def trained_texts(self) -> list[str]:
        """The text of every trained span, in order (a span split by the ✂ cut counts once)."""
        out: list[str] = []
        prev_trained = False
        for r in self.runs:
            if r.trained and prev_trained:
                out[-1] += r.text
            elif r.trained:
                out.append(r.text)
            prev_trained = r.trained
        return out


def _pieces(tokenizer: Any, ids: list[int]) -> list[tuple[str, list[int]]]:
    """The text of each token of a run; a token that decodes to part of a character (byte-level BPE) is joined with
    the next ones until the character is whole."""
    out: list[tuple[str, list[int]]] = []
    pending: list[int] = []
    for i, t in enumerate(ids):
        pending.append(t)
        text = tokenizer.decode(pending, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd") and i + 1 < len(ids) and len(pending) < 4:
            continue
        out.append((text, pending))
        pending = []
    return out


def token_runs(
    tokenizer: Any, ids: np.ndarray, mask: np.ndarray, cut_at: int | None = None, head: int = 0
) -> list[Run]:
    """Split a row into runs of equal (mask, beyond-the-cut, head) state and decode each run from its ids.

    Runs never split a character: a token that overlaps an assistant span is marked whole, so the bytes of one
    character (which share their character offsets) always get the same mask."""
    n = len(ids)
    state = mask.astype(np.int8) * 2
    if cut_at is not None and cut_at < n:
        state[cut_at:] += 1
    state[:head] += 4
    bounds = [0, *(np.flatnonzero(np.diff(state)) + 1).tolist(), n]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a == b:
            continue
        part = ids[a:b].tolist()
        text = tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        out.append(Run(text, bool(state[a] & 2), bool(state[a] & 1), _pieces(tokenizer, part), bool(state[a] & 4)))
    return out


def system_head(tokenizer: Any, ids: np.ndarray, mask: np.ndarray, eos_token: str | None, cut_at: int | None) -> int:
    """How many leading tokens are the row's system turn (up to its end-of-turn token and the whitespace after it),
    0 when the row does not open with an untrained system turn."""
    if not eos_token:
        return 0
    eos_id = tokenizer.convert_tokens_to_ids(eos_token)
    hits = np.flatnonzero(ids == eos_id) if isinstance(eos_id, int) else np.array([], dtype=np.int64)
    if not len(hits):
        return 0
    end = int(hits[0]) + 1
    while end < len(ids) and not tokenizer.decode([int(ids[end])]).strip():
        end += 1
    first_line = tokenizer.decode(ids[: min(end, 8)].tolist(), skip_special_tokens=False).split("\n")[0]
    if "system" not in first_line or mask[:end].any() or (cut_at is not None and cut_at < end):
        return 0
    return end


def _think_mode(messages: list[dict[str, Any]], kwargs: dict[str, Any]) -> str:
    system = next((m.get("content") or "" for m in messages if m.get("role") == "system"), "")
    if "/no_think" in system:
        return "/no_think"
    if "/think" in system:
        return "/think"
    return "/think" if kwargs.get("enable_thinking", True) else "/no_think"


def collect(run: RunConfig, tokenizer: Any, names: list[str]) -> list[ShownRow]:
    """The first inspect.n valid rows of each source, through the data stage's render + tokenise + mask."""
    spec = RenderSpec.build(run.template, tokenizer)
    cut_at = run.packing.max_length if packing_choice(run)[1] == "truncate" else None
    shown = []
    for name in names:
        ds = load_source(name, run.mixture.sources[name])
        rows, msgs, kws = [], [], []
        for i in range(len(ds)):
            if len(rows) == run.inspect.n:
                break
            row = ds[i]
            if row_problem(row["messages"]) is None:
                rows.append(i)
                msgs.append(row["messages"])
                kws.append(row.get("chat_template_kwargs"))
        enc = encode_conversations(spec, tokenizer, msgs, kws)
        for j, r in enumerate(rows):
            ids, _, mask = enc.row(j)
            think = _think_mode(msgs[j], row_kwargs(spec, kws[j]))
            head = system_head(tokenizer, ids, mask, spec.eos_token, cut_at)
            runs = token_runs(tokenizer, ids, mask, cut_at, head)
            cut = cut_at if cut_at is not None and cut_at < len(ids) else None
            shown.append(ShownRow(name, r, len(ids), int(mask.sum()), think, runs, cut))
    return shown


def format_terminal(rows: list[ShownRow], color: bool) -> str:
    out = []
    # (the legend itself uses no bracket, so every bracket pair in the output is a trained span)
    legend = f"{GREEN}green{RESET}" if color else "between white square brackets"
    out.append(f"legend: trained tokens are {legend}; {CUT} = cut by packing.max_length (what follows is not seen)")
    for r in rows:
        out.append(f"\n━━ {r.source} · row {r.row} · {r.tokens} tokens · {r.trained} trained · {r.think} ━━")
        parts = []
        was_cut = False
        for run in r.runs:
            if run.cut and not was_cut:
                parts.append(CUT)
                was_cut = True
            text = run.text
            if color:
                style = (GREEN if run.trained else "") + (DIM if run.cut else "")
                parts.append(f"{style}{text}{RESET}" if style else text)
            else:
                parts.append(f"{OPEN}{text}{CLOSE}" if run.trained else text)
        out.append("".join(parts))
    return "\n".join(out) + "\n"


def _token_spans(run: Run, parity: int) -> tuple[str, int]:
    """A run's tokens as <span class=tN title="id 123">: N alternates across the row so token boundaries show."""
    out = []
    for text, ids in run.tokens or [(run.text, [])]:
        title = ("id " if len(ids) == 1 else "ids ") + " ".join(map(str, ids))
        out.append(f'<span class=t{parity} title="{title}">{html.escape(text)}</span>')
        parity ^= 1
    return "".join(out), parity


def format_html(rows: list[ShownRow], title: str, notes: list[str]) -> str:
    """The page: a <div class=row> per row; trained runs in <mark>; the leading system turn in a <details> (open the
    first time a system turn appears, closed where it repeats one shown above); the part cut by packing.max_length in
    <span class=cut-text> after a <span class=cut> label, never in <mark>."""
    css = (
        "body{font-family:sans-serif;margin:2em;max-width:110em}"
        ".row{white-space:pre-wrap;font-family:monospace;background:#f7f7f7;padding:1em;border:1px solid #ddd;"
        "font-size:13px}"
        ".t0{background:rgba(0,0,0,.035)}.t1{background:rgba(0,0,0,.09)}"
        "mark{background:#b6f2b6;outline:1px solid #4caf50}mark .t1{background:#9be39b}"
        ".cut-text,.cut-text span{color:#aaa;background:none}"
        ".cut{color:#c00;font-weight:bold;font-family:sans-serif}"
        "details.system{border-left:3px solid #bbb;padding-left:.5em;margin-bottom:.3em}"
        "details.system summary{font-family:sans-serif;color:#555;cursor:pointer}"
        "h3{font-size:14px;margin-bottom:.2em}"
    )
    body = [f"<h2>{html.escape(title)}</h2>"]
    body.append("<p>Highlighted (<mark class=legend>like this</mark>) = tokens that carry loss. ")
    body.append("Each token has its own shade; hover it for its token id. ")
    body.append(f"<span class=cut>{CUT} cut at max_length</span> = packing.max_length cuts the row there; ")
    body.append("<span class=cut-text>grey text</span> after it is never trained on. ")
    body.append("A system turn that repeats one shown above is collapsed (click to expand).</p>")
    body += [f"<p>{html.escape(n)}</p>" for n in notes]
    seen: dict[str, str] = {}  # system turn text -> where it was first shown
    for r in rows:
        body.append(
            f"<h3>{html.escape(r.source)} · row {r.row} · {r.tokens} tokens · {r.trained} trained · "
            f"{html.escape(r.think)}</h3>"
        )
        parts, head, parity, was_cut = [], [], 0, False
        for run in r.runs:
            spans, parity = _token_spans(run, parity)
            if run.head:
                head.append(spans)
                continue
            if run.cut:
                if not was_cut:
                    parts.append(f"<span class=cut>{CUT} cut at max_length ({r.cut_at} tokens)</span>")
                    was_cut = True
                parts.append(f'<span class=cut-text title="cut at max_length: not trained">{spans}</span>')
            else:
                parts.append(f"<mark>{spans}</mark>" if run.trained else spans)
        if head:
            text = "".join(run.text for run in r.runs if run.head)
            n = sum(len(ids) for run in r.runs if run.head for _, ids in run.tokens)
            where = f"{r.source} row {r.row}"
            if text in seen:
                summary = f"system prompt ({n} tokens): the same as {seen[text]}, collapsed (click to expand)"
                parts.insert(0, f"<details class=system><summary>{html.escape(summary)}</summary>{''.join(head)}"
                                "</details>")  # fmt: skip
            else:
                seen[text] = where
                summary = f"system prompt ({n} tokens)"
                parts.insert(0, f"<details class=system open><summary>{html.escape(summary)}</summary>"
                                f"{''.join(head)}</details>")  # fmt: skip
        body.append(f"<div class=row>{''.join(parts)}</div>")
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{css}</style></head><body>{''.join(body)}</body></html>\n"
    )


def run_inspect(run: RunConfig, run_dir: Path) -> dict[str, Any]:
    """The inspect stage: print the highlighted rows, write inspect.html, return a summary."""
    tokenizer = build_tokenizer(run)
    names = [run.inspect.source] if run.inspect.source else sorted(run.mixture.sources)
    spec = RenderSpec.build(run.template, tokenizer)
    report = check_template(run, spec, tokenizer, raise_on_failure=False, names=names)
    rows = collect(run, tokenizer, names)
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    print(report.format(), flush=True)
    sys.stdout.write(format_terminal(rows, color))
    sys.stdout.flush()
    title = f"sft-exp inspect: train_on={spec.train_on}, end-of-turn={spec.eos_token}"
    notes = [report.format()]
    path = run_dir / "inspect.html"
    path.write_text(format_html(rows, title, notes), encoding="utf-8")
    print(f"\nwrote {path}", flush=True)
    return {
        "inspect_html": str(path),
        "rows": [{"source": r.source, "row": r.row, "tokens": r.tokens, "trained": r.trained} for r in rows],
        "template_check": report.summary(),
    }
