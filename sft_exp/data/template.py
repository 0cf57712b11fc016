"""Conversations -> token ids + assistant mask, batched, identical to transformers' `apply_chat_template`.

`encode_conversations` returns, token for token and mask for mask, what `tokenizer.apply_chat_template(messages,
tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs)` returns for each row, then applies
`template.train_on`. It renders through transformers' public `render_jinja_template` (rows grouped by their template
kwargs, one call per group), encodes with the tokenizer's Rust backend, and marks every token whose character range
overlaps a `{% generation %}` span (transformers' rule, vectorised). `sft_exp.data.fast_render` holds the fast path:
exact ports of the shipped templates and piece-cached tokenisation, both proven identical by tests/test_template.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from inspect import signature
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from sft_exp.config import TemplateConfig, TrainOn
from sft_exp.data import fast_render
from sft_exp.data.fast_render import piece_tokenizer
from sft_exp.data.formats import untrained_assistant_turns
from sft_exp.errors import TemplateError

GENERATION_RE = r"\{\%-?\s*generation\s*-?\%\}"
# A private-use character: probe contents that cannot collide with template text.
_PROBE = "\ue000"

Spans = list[tuple[int, int]]


def read_template(chat_template: str | None) -> str | None:
    """Inline template text, or the contents of a .jinja file when given a path."""
    if chat_template is None:
        return None
    if chat_template.endswith(".jinja") and "\n" not in chat_template:
        p = Path(chat_template)
        if not p.exists():
            raise FileNotFoundError(f"template.chat_template: file '{chat_template}' does not exist")
        return p.read_text()
    return chat_template


@dataclass(frozen=True)
class RenderSpec:
    """Everything besides the rows that decides the tokens and the mask (all of it goes into the cache key)."""

    chat_template: str
    enable_thinking: bool
    date_string: str | None
    special_tokens: dict[str, Any]
    train_on: str = TrainOn.content.value
    eos_token: str | None = None  # the end-of-turn token (the tokenizer's eos after build_tokenizer)

    @classmethod
    def build(cls, tcfg: TemplateConfig, tokenizer: Any) -> RenderSpec:
        """The spec of a template config and the tokenizer carrying the template; TemplateError when it has none."""
        template = tokenizer.chat_template
        if not isinstance(template, str) or not template:
            raise TemplateError(
                "template: the tokenizer has no chat template. Set template=smollm3 or template.chat_template"
            )
        train_on = tcfg.train_on.value if isinstance(tcfg.train_on, TrainOn) else str(tcfg.train_on)
        return cls(
            template,
            tcfg.enable_thinking,
            tcfg.date_string,
            dict(tokenizer.special_tokens_map),
            train_on,
            tokenizer.eos_token,
        )

    @property
    def key(self) -> str:
        fields = [self.chat_template, self.enable_thinking, self.date_string, self.special_tokens]
        return json.dumps([*fields, self.train_on, self.eos_token], sort_keys=True, default=str)


def row_kwargs(spec: RenderSpec, kwargs: Any) -> dict[str, Any]:
    """A row's chat_template_kwargs over the config defaults; None values (Arrow's filler) count as absent."""
    out: dict[str, Any] = {"enable_thinking": spec.enable_thinking}
    if spec.date_string is not None:
        out["date_string"] = spec.date_string
    if kwargs:
        out.update({k: v for k, v in kwargs.items() if v is not None})
    return out


# ------------------------------------------------------------------------------------------------------- rendering
def _group_key(value: Any) -> Any:
    """A hashable key equal for two kwargs values exactly when they render alike (types and dict order kept)."""
    tp = type(value)
    if tp is dict:
        return (dict, tuple(((type(k), k), _group_key(v)) for k, v in value.items()))
    if tp is list or tp is tuple:
        return (tp, tuple(map(_group_key, value)))
    try:
        hash(value)
    except TypeError:
        return (tp, id(value))
    return (tp, value)


def _without_none(conversation: Any) -> list[Any]:
    """apply_chat_template's normalisation of dict messages: keys whose value is None are dropped."""
    return [{k: v for k, v in m.items() if v is not None} if isinstance(m, Mapping) else m for m in conversation]


class Renderer:
    """A spec's template: renders conversations to (text, generation spans) and applies `template.train_on`.

    Rows go through the template's exact port (`fast_render.port_for`) when it has one and the row is one the port
    handles, else through transformers' `render_jinja_template`. `fast_rows` / `jinja_rows` count each path's rows.
    `header` is the assistant header the template writes for a generation prompt (None when it writes none).
    """

    def __init__(self, spec: RenderSpec) -> None:
        from transformers import PreTrainedTokenizerBase

        self.spec = spec
        args = set(signature(PreTrainedTokenizerBase.apply_chat_template).parameters)
        self._reserved = frozenset(args - {"self", "kwargs", "tools", "documents", "add_generation_prompt"})
        self._checked_keys: set[frozenset[str]] = set()
        self.port = fast_render.port_for(spec.chat_template, spec.special_tokens)
        self.fast_rows = 0
        self.jinja_rows = 0
        self.prompts, self.header = self._generation_prompts()
        # What a generation prompt adds after the header (the empty no_think think block), longest first.
        n = len(self.header or "")
        self._rests = sorted({p[n:] for p in self.prompts if len(p) > n}, key=len, reverse=True)

    def render(
        self, messages: list[Any], kwargs: list[Any], add_generation_prompt: bool = False, use_port: bool = True
    ) -> tuple[list[str], list[Spans]]:
        """Render a batch as `apply_chat_template` renders each row.

        Args:
            messages: one conversation (list of messages) per row.
            kwargs: each row's chat_template_kwargs (None or a mapping), merged over the spec's defaults.
            add_generation_prompt: the default when a row's kwargs do not set it.
            use_port: False renders every row through Jinja.

        Returns:
            (texts, generation spans per row as (start, end) character ranges).
        """
        texts: list[str] = [""] * len(messages)
        spans: list[Spans] = [[] for _ in messages]
        groups: dict[Any, tuple[dict[str, Any], list[int]]] = {}
        port = self.port if use_port else None
        for i, (m, k) in enumerate(zip(messages, kwargs)):
            kw = row_kwargs(self.spec, k)
            out = port(m, kw, add_generation_prompt) if port is not None else None
            if out is not None:
                texts[i], spans[i] = out
                self.fast_rows += 1
            else:
                groups.setdefault(_group_key(kw), (kw, []))[1].append(i)
        for kw, rows in groups.values():
            self.jinja_rows += len(rows)
            t, s = self.render_jinja([messages[i] for i in rows], kw, add_generation_prompt)
            for i, text, sp in zip(rows, t, s):
                texts[i], spans[i] = text, [(int(a), int(b)) for a, b in sp]
        return texts, spans

    def render_jinja(
        self, conversations: list[Any], kw: dict[str, Any], add_generation_prompt: bool = False
    ) -> tuple[list[str], list[Any]]:
        """Conversations sharing the merged kwargs `kw` -> (texts, generation spans), through transformers' public
        `render_jinja_template`, with the inputs `apply_chat_template` gives it (None-valued message keys dropped,
        special tokens as template variables under the kwargs)."""
        from transformers.utils.chat_template_utils import render_jinja_template

        keys = frozenset(kw)
        if keys not in self._checked_keys:
            clash = sorted(keys & self._reserved)
            if clash:
                raise TemplateError(
                    f"template: chat_template_kwargs keys {clash} are arguments of apply_chat_template, not template "
                    "variables. Remove them from the rows' chat_template_kwargs"
                )
            self._checked_keys.add(keys)
        variables = dict(kw)
        tools = variables.pop("tools", None)
        for tool in tools or ():
            if not isinstance(tool, dict) and not callable(tool):
                what = type(tool).__name__
                raise TemplateError(f"template: a `tools` entry must be a JSON schema (a dict), not {what}")
        documents = variables.pop("documents", None)
        add_generation_prompt = variables.pop("add_generation_prompt", add_generation_prompt)
        return render_jinja_template(
            conversations=[_without_none(c) for c in conversations],
            tools=tools,
            documents=documents,
            chat_template=self.spec.chat_template,
            return_assistant_tokens_mask=True,
            add_generation_prompt=add_generation_prompt,
            **{**self.spec.special_tokens, **variables},
        )

    def _generation_prompts(self) -> tuple[list[str], str | None]:
        """The template's generation prompts (one per reasoning mode), longest first, and their common prefix: the
        assistant header ("<|im_start|>assistant\\n"). Found by rendering a one-user-turn probe with and without
        add_generation_prompt, so nothing about the template's syntax is assumed."""
        probe = [{"role": "user", "content": _PROBE}]
        prompts = set()
        for thinking in (True, False):
            try:
                kw = [{"enable_thinking": thinking}]
                (bare,), _ = self.render([probe], kw)
                (prompted,), _ = self.render([probe], kw, add_generation_prompt=True)
            except Exception:  # noqa: BLE001 - a template may refuse the probe; then it has no known header
                continue
            if prompted.startswith(bare) and len(prompted) > len(bare):
                prompts.add(prompted[len(bare) :])
        if not prompts:
            return [], None
        ordered = sorted(prompts, key=len, reverse=True)
        header = ordered[0]
        for p in ordered[1:]:
            n = 0
            while n < min(len(header), len(p)) and header[n] == p[n]:
                n += 1
            header = header[:n]
        return ordered, header or None

    def adjust_spans(self, text: str, spans: Spans) -> Spans:
        """Spans after template.train_on: whatever the markers wrap, `content` keeps the assistant content + its
        end-of-turn token, `content_and_header` adds the turn's header and empty think block before it, `template`
        keeps exactly what the markers wrap (TRL's assistant_only_loss)."""
        if self.spec.train_on == TrainOn.template.value:
            return list(spans)
        out: Spans = []
        eos = self.spec.eos_token
        prev_end = 0
        for s, e in spans:
            # markers that enclose the header: the header, and the think block the generation prompt adds after it,
            # are prompt scaffolding, not content (a span starting after the header is left as it is)
            if self.header and text.startswith(self.header, s) and s + len(self.header) < e:
                s += len(self.header)
                for rest in self._rests:
                    if text.startswith(rest, s) and s + len(rest) < e:
                        s += len(rest)
                        break
            if eos:  # text after the end-of-turn token inside the markers (a newline) is not the turn's
                k = text.rfind(eos, s, e)
                if k >= 0 and not text[k + len(eos) : e].strip():
                    e = k + len(eos)
            if self.spec.train_on == TrainOn.content_and_header.value:
                if not self.header:
                    raise TemplateError(
                        "template.train_on=content_and_header: the template writes no generation prompt "
                        "(add_generation_prompt=True adds nothing), so the assistant header is unknown. "
                        "Use template.train_on=content"
                    )
                h = text.rfind(self.header, prev_end, s)
                if h < 0:
                    raise TemplateError(
                        f"template.train_on=content_and_header: no assistant header {self.header!r} before the "
                        f"assistant span at character {s} ({text[s : s + 40]!r}). Use template.train_on=content"
                    )
                s = h
            out.append((s, e))
            prev_end = e
        return out


_RENDERERS: dict[str, Renderer] = {}


def renderer(spec: RenderSpec) -> Renderer:
    """The Renderer of a spec, built once per process."""
    r = _RENDERERS.get(spec.key)
    if r is None:
        r = _RENDERERS[spec.key] = Renderer(spec)
    return r


# ------------------------------------------------------------------------------------------------------- the mask
def spans_mask(offsets: np.ndarray, row_offsets: np.ndarray, spans: list[Spans]) -> np.ndarray:
    """transformers' assistant-mask rule for a batch: a token is marked when its character range overlaps a span
    (for each token, the first span that does not end at or before the token's start).

    Args:
        offsets: (n, 2) character offsets of the batch's tokens, each within its row's text.
        row_offsets: row i's tokens are [row_offsets[i], row_offsets[i + 1]).
        spans: per row, its (start, end) character spans, in order.

    Returns:
        int8 mask of length n.
    """
    n_rows = len(row_offsets) - 1
    mask = np.zeros(len(offsets), dtype=np.int8)
    if len(offsets) == 0 or not any(spans):
        return mask
    # Put every row in one coordinate space (rows 1 char apart, so a row's tokens never reach another row's spans)
    # and run transformers' single pass for all tokens at once.
    tok_rows = np.repeat(np.arange(n_rows), np.diff(row_offsets))
    width = int(max(offsets[:, 1].max(initial=0), max((e for sp in spans for _, e in sp), default=0))) + 1
    base = np.arange(n_rows, dtype=np.int64) * width
    sp = np.asarray([(s + base[r], e + base[r]) for r, row in enumerate(spans) for s, e in row], dtype=np.int64)
    if np.any(np.diff(sp[:, 1]) < 0):  # spans out of order (nested markers): the per-row loop, as transformers
        return _spans_mask_loop(offsets, row_offsets, spans)
    starts = offsets[:, 0] + base[tok_rows]
    ends = offsets[:, 1] + base[tok_rows]
    # span index of each token: the first span that does not end at or before the token's start; the pointer never
    # moves back within a row (running maximum).
    idx = np.searchsorted(sp[:, 1], starts, side="right")
    idx = np.maximum.accumulate(idx)
    ok = idx < len(sp)
    mask[ok] = (ends[ok] > sp[idx[ok], 0]).astype(np.int8)
    return mask


def _spans_mask_loop(offsets: np.ndarray, row_offsets: np.ndarray, spans: list[Spans]) -> np.ndarray:
    """transformers' per-token loop, verbatim (for spans that are out of order)."""
    mask = np.zeros(len(offsets), dtype=np.int8)
    for r, row in enumerate(spans):
        span_idx = 0
        for t in range(int(row_offsets[r]), int(row_offsets[r + 1])):
            start, end = offsets[t]
            while span_idx < len(row) and start >= row[span_idx][1]:
                span_idx += 1
            if span_idx == len(row):
                break
            if end > row[span_idx][0]:
                mask[t] = 1
    return mask


def drop_untrained(messages: Any, spans: Spans) -> Spans:
    """A row's spans without those of assistant turns marked not to train (the prompt's assistant turns of a
    prompt_completion row: only the completion is trained, as TRL does). The n-th span is the n-th assistant turn's;
    a template that does not write one span per assistant turn cannot tell them apart: TemplateError.

    Example:
        >>> msgs = [{"role": "assistant", "content": "a", "train": False}, {"role": "assistant", "content": "b"}]
        >>> drop_untrained(msgs, [(0, 5), (9, 14)])
        [(9, 14)]
    """
    skip = untrained_assistant_turns(messages) if isinstance(messages, list) else []
    if not skip:
        return spans
    n = sum(1 for m in messages if isinstance(m, Mapping) and m.get("role") == "assistant")
    if len(spans) != n:
        raise TemplateError(
            f"template: a prompt_completion row has {n} assistant turns but the template wraps {len(spans)} spans in "
            "{% generation %} markers, so the prompt's assistant turns cannot be left untrained. Use a template with "
            "one generation block per assistant turn (template=smollm3 or chatml)"
        )
    drop = set(skip)
    return [sp for i, sp in enumerate(spans) if i not in drop]


# -------------------------------------------------------------------------------------------------- the batch API
def encode_texts(tokenizer: Any, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One `backend_tokenizer.encode_batch(texts, add_special_tokens=False)` as flat arrays: (ids int32, character
    offsets (n, 2) int64 within each text, row offsets int64 (len(texts) + 1))."""
    encs = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    lens = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
    total = int(lens.sum())
    ids = np.fromiter(chain.from_iterable(e.ids for e in encs), dtype=np.int32, count=total)
    offs = np.fromiter(chain.from_iterable(chain.from_iterable(e.offsets for e in encs)), np.int64, 2 * total)
    return ids, offs.reshape(-1, 2), np.concatenate([[0], np.cumsum(lens)])


@dataclass
class Encoded:
    """A batch of conversations, tokenised: flat arrays + row offsets (row i is [row_offsets[i], row_offsets[i+1]))."""

    texts: list[str]
    spans: list[Spans]  # after template.train_on (raw marker spans when raw=True)
    ids: np.ndarray  # int32
    offsets: np.ndarray  # int64 (n, 2): character offsets within the row's text
    masks: np.ndarray  # int8
    row_offsets: np.ndarray  # int64, rows + 1
    piecewise: bool = field(default=True)  # encoded by fast_render.PieceTokenizer (else whole texts)

    def __len__(self) -> int:
        return len(self.texts)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, offsets, mask) of row i."""
        a, b = int(self.row_offsets[i]), int(self.row_offsets[i + 1])
        return self.ids[a:b], self.offsets[a:b], self.masks[a:b]


def encode_conversations(
    spec: RenderSpec, tokenizer: Any, messages: list[Any], kwargs: list[Any] | None = None, raw: bool = False
) -> Encoded:
    """Render + tokenise + mask a batch of conversations, untruncated.

    With raw=True, row i's ids and mask equal `tokenizer.apply_chat_template(messages[i], tokenize=True,
    return_dict=True, return_assistant_tokens_mask=True, **row_kwargs(spec, kwargs[i]))`'s input_ids and
    assistant_masks; by default the spans are first adjusted to `spec.train_on` (`Renderer.adjust_spans`).

    Args:
        spec: the template and its defaults (`RenderSpec.build`).
        tokenizer: a fast tokenizer (one with `backend_tokenizer`) carrying `spec.chat_template`.
        messages: one conversation (a list of message dicts) per row.
        kwargs: each row's chat_template_kwargs (None: the spec's defaults).
        raw: keep the spans as the `{% generation %}` markers give them.

    Returns:
        Encoded: texts, spans and flat ids / offsets / mask with row offsets.

    Example:
        >>> from transformers import AutoTokenizer
        >>> from sft_exp.config import ASSETS, TemplateConfig
        >>> tok = AutoTokenizer.from_pretrained(ASSETS / "tiny_smollm3")
        >>> spec = RenderSpec.build(TemplateConfig(date_string="01 July 2025"), tok)
        >>> chat = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
        >>> enc = encode_conversations(spec, tok, [chat])
        >>> tok.decode(enc.ids[enc.masks == 1])
        '4<|im_end|>'
    """
    r = renderer(spec)
    texts, spans = r.render(messages, kwargs if kwargs is not None else [None] * len(messages))
    if not raw:
        spans = [r.adjust_spans(t, s) for t, s in zip(texts, spans)]
        spans = [drop_untrained(m, s) for m, s in zip(messages, spans)]
    pt = piece_tokenizer(tokenizer)
    ids, offsets, row_offsets = pt.encode(texts) if pt.piecewise else encode_texts(tokenizer, texts)
    return Encoded(texts, spans, ids, offsets, spans_mask(offsets, row_offsets, spans), row_offsets, pt.piecewise)
