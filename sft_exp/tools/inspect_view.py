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

The same view is written to <run_dir>/inspect.html (trained runs in <mark>, cut text in <del>).
"""

from __future__ import annotations

import html
import os
import sys
from dataclasses import dataclass
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
    """A maximal run of tokens with the same (trained, cut) state, decoded."""

    text: str
    trained: bool
    cut: bool = False


@dataclass
class ShownRow:
    source: str
    row: int
    tokens: int
    trained: int
    think: str
    runs: list[Run]

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


def token_runs(tokenizer: Any, ids: np.ndarray, mask: np.ndarray, cut_at: int | None = None) -> list[Run]:
    """Split a row into runs of equal (mask, beyond-the-cut) state and decode each run from its ids.

    Runs never split a character: a token that overlaps an assistant span is marked whole, so the bytes of one
    character (which share their character offsets) always get the same mask."""
    n = len(ids)
    state = mask.astype(np.int8) * 2
    if cut_at is not None and cut_at < n:
        state[cut_at:] += 1
    bounds = [0, *(np.flatnonzero(np.diff(state)) + 1).tolist(), n]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a == b:
            continue
        text = tokenizer.decode(ids[a:b].tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        out.append(Run(text, bool(state[a] & 2), bool(state[a] & 1)))
    return out


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
            runs = token_runs(tokenizer, ids, mask, cut_at)
            shown.append(ShownRow(name, r, len(ids), int(mask.sum()), think, runs))
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


def format_html(rows: list[ShownRow], title: str, notes: list[str]) -> str:
    css = (
        "body{font-family:sans-serif;margin:2em;max-width:110em}"
        "pre{white-space:pre-wrap;background:#f7f7f7;padding:1em;border:1px solid #ddd;font-size:13px}"
        "mark{background:#b6f2b6;outline:1px solid #4caf50}del{color:#999}"
        ".cut{color:#c00;font-weight:bold}h3{font-size:14px;margin-bottom:.2em}"
    )
    body = [f"<h2>{html.escape(title)}</h2>"]
    body.append("<p>Highlighted (<mark class=legend>like this</mark>) = tokens that carry loss. ")
    body.append("<span class=cut>✂</span> = cut by ")
    body.append("packing.max_length; <del>struck text</del> is never trained on.</p>")
    body += [f"<p>{html.escape(n)}</p>" for n in notes]
    for r in rows:
        body.append(
            f"<h3>{html.escape(r.source)} · row {r.row} · {r.tokens} tokens · {r.trained} trained · "
            f"{html.escape(r.think)}</h3>"
        )
        parts, was_cut = [], False
        for run in r.runs:
            if run.cut and not was_cut:
                parts.append(f"<span class=cut>{CUT}</span>")
                was_cut = True
            text = html.escape(run.text)
            text = f"<mark>{text}</mark>" if run.trained else text
            parts.append(f"<del>{text}</del>" if run.cut else text)
        body.append(f"<pre>{''.join(parts)}</pre>")
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
