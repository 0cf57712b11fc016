"""Conversations -> token ids + assistant mask, batched.

Each row is rendered once through the chat template (transformers' own Jinja renderer, which also records the
character spans inside `{% generation %}` markers), the rendered texts of a batch are tokenised together by the Rust
tokenizer with offsets, and the mask marks every token that overlaps an assistant span. This is the same rule
`apply_chat_template(..., return_assistant_tokens_mask=True)` applies, so the output is identical to it token for
token, but one batched tokenizer call replaces a tokenizer call per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sft_exp.config import TemplateConfig
from sft_exp.data.sources import normalize_messages

GENERATION_RE = r"\{\%-?\s*generation\s*-?\%\}"


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
    """Everything besides the rows that decides the tokens (all of it goes into the cache key)."""

    chat_template: str
    enable_thinking: bool
    date_string: str | None
    special_tokens: dict[str, Any]

    @classmethod
    def build(cls, tcfg: TemplateConfig, tokenizer: Any) -> RenderSpec:
        template = tokenizer.chat_template
        if not isinstance(template, str) or not template:
            raise ValueError("the tokenizer has no chat template; set template=smollm3 or template.chat_template")
        return cls(template, tcfg.enable_thinking, tcfg.date_string, dict(tokenizer.special_tokens_map))


def row_kwargs(spec: RenderSpec, kwargs: Any) -> dict[str, Any]:
    """A row's chat_template_kwargs over the config defaults; None values (Arrow's filler) count as absent."""
    out: dict[str, Any] = {"enable_thinking": spec.enable_thinking}
    if spec.date_string is not None:
        out["date_string"] = spec.date_string
    if kwargs:
        out.update({k: v for k, v in kwargs.items() if v is not None})
    return out


def render(spec: RenderSpec, messages: Any, kwargs: Any) -> tuple[str, list[tuple[int, int]]]:
    """One conversation -> (text, assistant character spans)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    texts, spans = render_jinja_template(
        conversations=[normalize_messages(messages)],
        chat_template=spec.chat_template,
        return_assistant_tokens_mask=True,
        **{**spec.special_tokens, **row_kwargs(spec, kwargs)},
    )
    return texts[0], [tuple(s) for s in spans[0]]


def spans_to_mask(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """1 for every token whose [start, end) character range overlaps an assistant span."""
    mask = np.zeros(len(offsets), dtype=np.int8)
    if len(offsets) == 0:
        return mask
    starts, ends = offsets[:, 0], offsets[:, 1]
    for s, e in spans:
        mask[(ends > s) & (starts < e)] = 1
    return mask


def tokenize_conversations(
    spec: RenderSpec, tokenizer: Any, messages: list[Any], kwargs: list[Any] | None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A batch of conversations -> (input_ids per row, assistant mask per row), untruncated."""
    kwargs = kwargs if kwargs is not None else [None] * len(messages)
    rendered = [render(spec, m, k) for m, k in zip(messages, kwargs)]
    encodings = tokenizer.backend_tokenizer.encode_batch([t for t, _ in rendered], add_special_tokens=False)
    ids, masks = [], []
    for enc, (_, spans) in zip(encodings, rendered):
        ids.append(np.asarray(enc.ids, dtype=np.int32))
        masks.append(spans_to_mask(np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2), spans))
    return ids, masks
