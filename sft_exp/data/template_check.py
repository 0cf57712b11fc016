"""The template check: before anything is tokenised, prove on samples of every source that the loss mask is right.

    check_template(run, spec, tokenizer) -> TemplateReport   (raises TemplateError when the mask cannot be trusted)

For every source, up to SAMPLE_ROWS rows spread over the source are rendered, tokenised and masked exactly as the
data stage will do it, and checked three ways:

1. Identity: token ids and the marker mask equal transformers' `apply_chat_template(..., return_assistant_tokens_mask=
   True)` on the same row (the fast path is a re-implementation of its cost, never of its result).
2. Real rows: every row yields assistant (trained) tokens. TRL raises on a row without any; here the whole source
   is named before any compute is spent.
3. Probe rows: each sampled row again with its contents replaced by unique markers (its roles, order, kwargs and the
   /think, /no_think, /system_override flags of its system prompt kept), so where every message landed in the text
   is known exactly. Then: no trained token touches system, user or tool text (or the template's own header text);
   every assistant content is trained in full; the token right after it is the end-of-turn token (template.eos_token,
   the tokenizer's eos) and it is trained (a model that never learns to emit it never stops). Under
   template.train_on=template whatever the markers wrap is allowed (the header, think block and newline too); the
   prompt's assistant turns of a prompt_completion row must not be trained.
Any failure stops the run (assistant_only_loss=true) with the source, the row and the text at fault.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sft_exp.data.formats import TRAIN_KEY
from sft_exp.data.template import RenderSpec, encode_conversations, renderer, row_kwargs
from sft_exp.errors import TemplateError

SAMPLE_ROWS = 32  # rows per source checked for the mask
IDENTITY_ROWS = 8  # of which compared with apply_chat_template too (a per-row call: the slow path)
FLAGS = ("/system_override", "/no_think", "/think")
MAX_LISTED = 5


@dataclass
class TemplateReport:
    """What the check found: `problems` stop the run, `warnings` are printed."""

    train_on: str
    eos_token: str | None
    piecewise: bool
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "train_on": self.train_on,
            "eos_token": self.eos_token,
            "tokenisation": "pieces between added tokens" if self.piecewise else "whole texts",
            "sources": self.sources,
            "problems": self.problems,
            "warnings": self.warnings,
        }

    def format(self) -> str:
        rows = sum(s["rows_checked"] for s in self.sources.values())
        head = (
            f"template check: {'ok' if self.ok else 'FAILED'} ({len(self.sources)} sources, {rows} rows; "
            f"train_on={self.train_on}, end-of-turn={self.eos_token})"
        )
        lines = [head] + [f"  problem: {p}" for p in self.problems] + [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        if self.problems:
            n = len(self.problems)
            raise TemplateError(
                f"template check failed ({n} problem{'s' * (n > 1)}); the loss mask cannot be trusted:\n  - "
                + "\n  - ".join(self.problems[:10])
            )


def sample_indices(n: int, k: int = SAMPLE_ROWS) -> list[int]:
    """k row indices spread evenly over n rows (first and last included)."""
    if n <= k:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, k).round()})


def _snippet(text: str, a: int, b: int, pad: int = 30) -> str:
    return repr(text[max(0, a - pad) : a]) + " [" + repr(text[a:b]) + "] " + repr(text[b : b + pad])


def _masked_chars(text_len: int, offsets: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per character: 1 if a trained token covers it."""
    cover = np.zeros(text_len + 1, dtype=np.int32)
    for s, e in offsets[mask.astype(bool)]:
        cover[s] += 1
        cover[e] -= 1
    return (np.cumsum(cover)[:text_len] > 0).astype(np.int8)


def probe_row(messages: list[dict[str, Any]], tag: str) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """The row with every content replaced by a unique marker; returns (messages, [(role, marker)] in order).
    A system prompt keeps its reasoning flags so the template takes the same branch."""
    out, markers = [], []
    for i, m in enumerate(messages):
        role = m.get("role")
        marker = f"[[{tag} {role} {i}]]"
        if role == "assistant" and m.get(TRAIN_KEY) is False:
            role = "prompt assistant"  # a prompt_completion row's prompt turn: rendered, never trained
        content = m.get("content")
        new = dict(m)
        if role == "system" and isinstance(content, str):
            new["content"] = " ".join([marker, *[f for f in FLAGS if f in content]])
        elif isinstance(content, str):
            new["content"] = marker
        else:
            out.append(new)
            continue
        out.append(new)
        markers.append((role, marker))
    return out, markers


def _check_probe(
    text: str, offsets: np.ndarray, mask: np.ndarray, ids: np.ndarray, markers: list[tuple[str, str]], ctx: dict
) -> tuple[list[str], list[str]]:
    """Problems and warnings of one probe row (see the module docstring, point 3)."""
    problems, warnings = [], []
    where = f"{ctx['source']} row {ctx['row']}"
    covered = _masked_chars(len(text), offsets, mask)
    allowed = np.zeros(len(text), dtype=bool)
    if ctx["train_on"] == "template":  # exactly the markers' spans: header, think block and newline included
        for a, b in ctx.get("spans", ()):
            allowed[a:b] = True
    header, eos_id, eos = ctx["header"], ctx["eos_id"], ctx["eos"]
    prev_end = 0
    for role, marker in markers:
        pos = text.find(marker)
        if pos < 0:
            if role == "assistant":
                problems.append(f"{where}: the template does not render the content of an assistant turn")
            continue
        end = pos + len(marker)
        if role != "assistant":
            if covered[pos:end].any():
                what = "tool result" if role == "tool" else f"{role} text"
                problems.append(f"{where}: the mask covers {what}: {_snippet(text, pos, end)}")
            continue
        if not covered[pos:end].all():
            problems.append(f"{where}: the mask misses part of an assistant turn's content: {_snippet(text, pos, end)}")
        start = pos
        if ctx["train_on"] == "content_and_header" and header:
            h = text.rfind(header, prev_end, pos)
            start = h if h >= 0 else pos
        # the end-of-turn token: the first token that starts at or after the content's end
        t = int(np.searchsorted(offsets[:, 0], end, side="left"))
        if t >= len(ids) or ids[t] != eos_id:
            nxt = repr(text[offsets[t, 0] : offsets[t, 1]]) if t < len(ids) else "the end of the text"
            problems.append(
                f"{where}: an assistant turn is not closed by the end-of-turn token {eos!r} (next: {nxt}). Set "
                "template.eos_token to the token the template ends assistant turns with"
            )
            allowed[start:end] = True
        else:
            if not mask[t]:
                problems.append(
                    f"{where}: the end-of-turn token {eos!r} after an assistant turn is not trained, so the model "
                    "never learns to stop. The template's {% generation %} markers must enclose it"
                )
            allowed[start : offsets[t, 1]] = True
            end = int(offsets[t, 1])
        prev_end = end
    leak = covered.astype(bool) & ~allowed
    if leak.any() and not problems:  # (text next to a role's content already reported is not reported twice)
        idx = np.flatnonzero(leak)
        runs = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1)
        texts = [(int(r[0]), int(r[-1]) + 1) for r in runs]
        if all(not text[a:b].strip() for a, b in texts):
            warnings.append(
                f"{where}: whitespace next to an assistant turn is trained: {[text[a:b] for a, b in texts]}"
            )
        else:
            a, b = next((a, b) for a, b in texts if text[a:b].strip())
            problems.append(f"{where}: the mask covers text outside the assistant turns: {_snippet(text, a, b)}")
    return problems, warnings


def check_rows(
    name: str, spec: RenderSpec, tokenizer: Any, messages: list[Any], kwargs: list[Any], rows: list[int]
) -> tuple[dict[str, Any], list[str], list[str]]:
    """Check one source's sampled rows; returns (per-source summary, problems, warnings)."""
    problems: list[str] = []
    warnings: list[str] = []
    summary: dict[str, Any] = {"rows_checked": len(rows), "trained_tokens": 0, "tokens": 0}
    try:
        raw = encode_conversations(spec, tokenizer, messages, kwargs, raw=True)
        real = encode_conversations(spec, tokenizer, messages, kwargs)
    except TemplateError as e:
        return summary, [f"{name}: {e}"], warnings
    except Exception as e:  # noqa: BLE001 - a template error names the row below
        for m, k, r in zip(messages, kwargs, rows):
            try:
                encode_conversations(spec, tokenizer, [m], [k])
            except Exception as e1:  # noqa: BLE001
                return summary, [f"{name} row {r}: the template fails to render it: {type(e1).__name__}: {e1}"], []
        return summary, [f"{name}: rendering failed: {type(e).__name__}: {e}"], warnings

    # 1. identity with transformers
    for i, (m, k, r) in enumerate(list(zip(messages, kwargs, rows))[:IDENTITY_ROWS]):
        ref = tokenizer.apply_chat_template(
            m, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **row_kwargs(spec, k)
        )
        ids, _, mask = raw.row(i)
        if list(ref["input_ids"]) != ids.tolist() or list(ref["assistant_masks"]) != mask.tolist():
            problems.append(
                f"{name} row {r}: sft-exp's batched tokenisation differs from transformers' apply_chat_template "
                "(a bug in sft-exp: please report it with the row)"
            )
            break
    # 2. every real row trains something
    trained = np.add.reduceat(real.masks, real.row_offsets[:-1]) if len(real.masks) else np.zeros(len(rows))
    trained = np.where(np.diff(real.row_offsets) > 0, trained, 0)
    summary["trained_tokens"] = int(trained.sum())
    summary["tokens"] = int(real.row_offsets[-1])
    empty = [r for r, t in zip(rows, trained) if t == 0]
    if empty:
        hint = (
            "The chat template has no {% generation %} markers around assistant turns"
            if summary["trained_tokens"] == 0
            else "The template drops or rewrites their assistant turns"
        )
        problems.append(
            f"{name}: {len(empty)} of {len(rows)} checked rows yield no assistant tokens "
            f"(rows {empty[:MAX_LISTED]}). {hint}"
        )
    # 3. probe rows
    r_ = renderer(spec)
    probes = [probe_row(m, "sft-exp") for m in messages]
    try:
        enc = encode_conversations(spec, tokenizer, [p for p, _ in probes], kwargs)
    except Exception as e:  # noqa: BLE001
        return summary, [*problems, f"{name}: the template fails on probe rows: {type(e).__name__}: {e}"], warnings
    ctx = {
        "source": name,
        "header": r_.header,
        "eos": spec.eos_token,
        "eos_id": tokenizer.convert_tokens_to_ids(spec.eos_token) if spec.eos_token else None,
        "train_on": spec.train_on,
    }
    for i, ((_, markers), r) in enumerate(zip(probes, rows)):
        ids, offsets, mask = enc.row(i)
        p, w = _check_probe(enc.texts[i], offsets, mask, ids, markers, {**ctx, "row": r, "spans": enc.spans[i]})
        problems += p
        warnings += w
    return summary, _dedupe(problems), _dedupe(warnings)


def _dedupe(items: list[str]) -> list[str]:
    """One line per finding that repeats over rows (same message but for the row number), with the count."""
    out: dict[str, list[str]] = {}
    for it in items:
        # "<source> row <n>: <finding>: <snippet>" -> "<source>: <finding>"
        key = re.sub(r" row \d+", "", it, count=1).split(": ")
        out.setdefault(": ".join(key[:2]), []).append(it)
    return [v[0] + (f" (and {len(v) - 1} more rows)" if len(v) > 1 else "") for v in out.values()]


def check_template(
    run: Any, spec: RenderSpec, tokenizer: Any, raise_on_failure: bool = True, names: list[str] | None = None
) -> TemplateReport:
    """Sample every source of the mixture (or `names`) and check its mask (see the module docstring)."""
    from sft_exp.data.sources import load_source, row_problem
    from sft_exp.data.template import piece_tokenizer

    report = TemplateReport(spec.train_on, spec.eos_token, piece_tokenizer(tokenizer).piecewise)
    if spec.eos_token is None:
        report.problems.append("the tokenizer has no eos token: set template.eos_token to the end-of-turn token")
    for name in names if names is not None else sorted(run.mixture.sources):
        ds = load_source(name, run.mixture.sources[name])
        idx = sample_indices(len(ds))
        sample = ds.select(idx)
        msgs = sample["messages"]
        kws = sample["chat_template_kwargs"] if "chat_template_kwargs" in sample.column_names else [None] * len(idx)
        keep = [i for i, m in enumerate(msgs) if row_problem(m) is None]  # bad rows are the data stage's business
        if not keep:
            report.sources[name] = {"rows_checked": 0, "trained_tokens": 0, "tokens": 0}
            continue
        summary, problems, warnings = check_rows(
            name, spec, tokenizer, [msgs[i] for i in keep], [kws[i] for i in keep], [idx[i] for i in keep]
        )
        report.sources[name] = summary
        report.problems += problems
        report.warnings += warnings
    if raise_on_failure:
        report.raise_if_failed()
    return report
