"""Conversations -> token ids + assistant mask, batched, identical to transformers' `apply_chat_template`.

    encode_conversations(spec, tokenizer, messages, kwargs) -> Encoded (texts, spans, flat ids/offsets/mask)
    tokenize_conversations(...)                             -> (input_ids per row, assistant mask per row)

The output is, token for token and mask for mask, what `tokenizer.apply_chat_template(messages, tokenize=True,
return_dict=True, return_assistant_tokens_mask=True, **kwargs)` returns for each row (tests/test_template.py checks
this on every demo row and on edge cases; the template check re-checks samples of every source at run time), at a
fraction of the cost of TRL's per-row preparation (bench/bench_template.py):

1. Render. The template is compiled once, as transformers compiles it (`_compile_jinja_template`: same extensions,
   among them the AssistantTracker that records the character span of every `{% generation %}` block, same filters,
   globals and options), in a subclass of its Jinja `ImmutableSandboxedEnvironment` that memoises the sandbox's
   attribute-safety decisions (they depend on the type and the attribute name only). Each row is rendered through the
   tracker directly (`_render_with_assistant_indices`) after the same input preparation `apply_chat_template` does
   (None-valued message keys dropped, `_plain_template_data`, reasoning-field aliases, special tokens as template
   variables). What is skipped is per-row overhead only: the regex scan of the template text, the per-row tokenizer
   call, the per-token Python mask loop. For the two templates the repo ships, the template body does not run either:
   `fast_render` holds an exact pure-Python port of each (same text, same generation spans), used only when the
   template text in use hashes to the shipped file's and the row is one the port handles (plain messages of known
   keys and roles, known kwargs of known types); any other template or row is rendered by Jinja as above.
   `Renderer.fast_rows` / `jinja_rows` count the rows of each path; SFT_EXP_FAST_RENDER=0 turns the ports off.
2. Tokenise. The Rust tokenizer first cuts a text at its added tokens (<|im_start|>, <|im_end|>, <think>, ...), then
   normalises, pre-tokenises and encodes each piece between them on its own. So a rendered text is cut the same way
   here and every distinct piece is encoded once (one batched Rust call per batch, and a bounded cache across batches):
   the system header, the persona, tool lists and role headers repeat across rows and are not encoded again. A
   tokenizer whose pieces are not independent (an added token with lstrip/rstrip/single_word, normalised added tokens
   under a normaliser, a Metaspace pre-tokenizer that prepends only to the first piece, split_special_tokens) takes the
   plain path: one `encode_batch` of the whole texts. With a byte-level BPE tokenizer (no normaliser, ByteLevel
   pre-tokenizer with its GPT-2 regex), a piece of printable ASCII seen for the first time is cut further into the
   pre-tokenizer's words (the same regex, which on that alphabet has the same classes in Python's engine) and each
   distinct word is encoded once: the Rust pre-tokenizer, not the BPE, was most of the tokenisation cost, and a row's
   content is made of few distinct words. A piece seen again (a header, a tool list) is encoded whole. A probe checks
   the split against the Rust tokenizer when the tokenizer is loaded; SFT_EXP_WORD_SPLIT=0 turns the split off.
3. Mask. transformers' rule: a token is marked when its character range overlaps a generation span (its single pass
   takes, for each token, the first span that does not end at or before the token's start), vectorised over the
   whole batch with `searchsorted`.

`template.train_on` then decides which tokens of an assistant turn carry loss, whatever the markers wrap: ``content``
(the default) is the assistant content + its end-of-turn token; ``content_and_header`` also trains the turn's header
(``<|im_start|>assistant\\n``) and the empty no_think think block the template writes. The header is found by asking
the template for its generation prompt (``add_generation_prompt=True``), so no template syntax is assumed. With the
repo's templates (markers around content + <|im_end|>) ``content`` leaves the spans as the markers give them, i.e.
the mask is exactly transformers'.
"""

from __future__ import annotations

import functools
import inspect as _inspect
import json
import os
import re
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from sft_exp.config import TemplateConfig, TrainOn
from sft_exp.data import fast_render
from sft_exp.errors import TemplateError

GENERATION_RE = r"\{\%-?\s*generation\s*-?\%\}"
# A private-use character: probe contents that cannot collide with template text.
_PROBE = "\ue000"
# Cut ASCII pieces into their pre-tokenizer words (PieceTokenizer._words_re); SFT_EXP_WORD_SPLIT=0 turns it off.
WORD_SPLIT = os.environ.get("SFT_EXP_WORD_SPLIT", "1") != "0"
# Characters outside the alphabet on which the word split equals the Rust pre-tokenizer's (PieceTokenizer._words_re).
_UNSAFE_FOR_WORDS = re.compile(r"[^\t\n\r\x20-\x7e]")
# Pieces kept in the tokenisation cache before it is cleared (bounds memory on sources of unique texts).
_PIECE_CACHE_MAX = 200_000


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
        return json.dumps(
            [
                self.chat_template,
                self.enable_thinking,
                self.date_string,
                self.special_tokens,
                self.train_on,
                self.eos_token,
            ],
            sort_keys=True,
            default=str,
        )


def row_kwargs(spec: RenderSpec, kwargs: Any) -> dict[str, Any]:
    """A row's chat_template_kwargs over the config defaults; None values (Arrow's filler) count as absent."""
    out: dict[str, Any] = {"enable_thinking": spec.enable_thinking}
    if spec.date_string is not None:
        out["date_string"] = spec.date_string
    if kwargs:
        out.update({k: v for k, v in kwargs.items() if v is not None})
    return out


# ------------------------------------------------------------------------------------------------------- rendering
@functools.cache
def _fast_sandbox_class() -> type:
    """jinja2's ImmutableSandboxedEnvironment with its attribute-safety decisions memoised: the same decisions (so the
    same output and the same protection), made once per (type, attribute) instead of on every access.

    Why this is exact: `is_safe_attribute` (ImmutableSandboxedEnvironment's: no leading underscore, not an internal
    attribute of functions/methods/types/code/frames/generators, not a mutating method of list/dict/set/deque) depends
    only on the object's type and the attribute name, never on the object or the value; `is_safe_callable` reads the
    `unsafe_callable`/`alters_data` flags, which a builtin method cannot carry. Everything else (the `str.format`
    wrapper, the undefined values, item access, calls) is the base class's code path."""
    import types

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    no_flags = (types.BuiltinMethodType, types.MethodWrapperType)  # no instance dict: the flags cannot be set

    class FastImmutableSandbox(ImmutableSandboxedEnvironment):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._safe: dict[tuple[type, str], bool] = {}
            self._dict_has: dict[str, bool] = {}

        def getattr(self, obj: Any, attribute: str) -> Any:
            tp = type(obj)
            if tp is dict:
                has = self._dict_has.get(attribute)
                if has is None:
                    has = self._dict_has[attribute] = hasattr({}, attribute)
                if not has:  # the base class's getattr fails here and falls back to the item
                    try:
                        return obj[attribute]
                    except (TypeError, LookupError):
                        return self.undefined(obj=obj, name=attribute)
            try:
                value = getattr(obj, attribute)
            except AttributeError:
                try:
                    return obj[attribute]
                except (TypeError, LookupError):
                    pass
                return self.undefined(obj=obj, name=attribute)
            # wrap_str_format only ever wraps str.format / str.format_map: skip it for every other str attribute
            if tp is not str or attribute in ("format", "format_map"):
                fmt = self.wrap_str_format(value)
                if fmt is not None:
                    return fmt
            key = (tp, attribute)
            safe = self._safe.get(key)
            if safe is None:
                safe = self._safe[key] = self.is_safe_attribute(obj, attribute, value)
            return value if safe else self.unsafe_undefined(obj, attribute)

        def is_safe_callable(self, obj: Any) -> bool:
            if type(obj) in no_flags:
                return True
            return super().is_safe_callable(obj)

    return FastImmutableSandbox


def compile_template(chat_template: str) -> Any:
    """The template compiled as transformers compiles it (same extensions incl. the AssistantTracker, filters,
    globals, tests, policies and options), in the memoised-decision subclass of its ImmutableSandboxedEnvironment.
    If transformers' environment is ever something else, its own compiled template is used as is."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from transformers.utils.chat_template_utils import _compile_jinja_template

    reference = _compile_jinja_template(chat_template)
    env0 = reference.environment
    if type(env0) is not ImmutableSandboxedEnvironment:
        return reference
    options = ("trim_blocks", "lstrip_blocks", "keep_trailing_newline", "newline_sequence", "autoescape", "finalize")
    env = _fast_sandbox_class()(
        extensions=[type(e) for e in env0.extensions.values()], **{o: getattr(env0, o) for o in options}
    )
    if env.undefined is not env0.undefined or env.optimized != env0.optimized:
        return reference
    env.filters.update(env0.filters)
    env.globals.update(env0.globals)
    env.tests.update(env0.tests)
    env.policies.update(env0.policies)
    return env.from_string(chat_template)


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _plain_data(value: Any, slow: Any) -> Any:
    """transformers' `_plain_template_data` (everything a template sees rebuilt from plain JSON types), with a fast
    path for the exact types datasets rows are made of; anything else goes through transformers' own function."""
    tp = type(value)
    if tp in _SCALARS:
        return value
    if tp is dict:
        return {(k if type(k) is str else slow(k)): _plain_data(v, slow) for k, v in value.items()}
    if tp is list:
        return [_plain_data(v, slow) for v in value]
    return slow(value)


def _apply_chat_template_args() -> frozenset[str]:
    from transformers import PreTrainedTokenizerBase

    params = set(_inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters)
    return frozenset(params - {"self", "kwargs", "tools", "documents", "add_generation_prompt"})


class Renderer:
    """One compiled template (transformers' sandboxed Jinja environment) + the spec's defaults; renders rows."""

    def __init__(self, spec: RenderSpec) -> None:
        import transformers
        from transformers.utils import chat_template_utils as ctu

        # transformers' own (private) pieces of apply_chat_template, so the output is its output by construction
        needed = ("_compile_jinja_template", "_render_with_assistant_indices", "_plain_template_data")
        needed += ("_alias_reasoning_fields", "_normalize_chat_messages", "get_json_schema")
        missing = [n for n in needed if not hasattr(ctu, n)]
        if missing:
            raise TemplateError(
                f"template: transformers {transformers.__version__} has no {missing} in chat_template_utils, which "
                "sft-exp renders through. Install the transformers version of constraints-cpu.txt"
            )
        self.spec = spec
        slow = ctu._plain_template_data
        self._slow_plain = slow
        self._plain = lambda value: _plain_data(value, slow)
        self._alias = ctu._alias_reasoning_fields
        self._reasoning_keys = frozenset(getattr(ctu, "_REASONING_FIELDS", ("reasoning_content", "thinking")))
        self._to_dicts = ctu._normalize_chat_messages
        self._render = ctu._render_with_assistant_indices
        self._schema = ctu.get_json_schema
        self._base = self._plain(dict(spec.special_tokens))
        self._reserved = _apply_chat_template_args()
        self._checked_keys: set[frozenset[str]] = set()
        # The exact pure-Python port of a shipped template (None for any other template text): rows it handles skip
        # the Jinja render; the counters say how many rows took which path.
        self.port = fast_render.port_for(spec.chat_template, self._base)
        self.fast_rows = 0
        self.jinja_rows = 0
        if self.port is None:
            self.template  # noqa: B018 - compiled now: a template that does not compile fails here, as before
        self.prompts, self.header = self._generation_prompts()
        # What a generation prompt adds after the header (the empty no_think think block), longest first.
        n = len(self.header or "")
        self._rests = sorted({p[n:] for p in self.prompts if len(p) > n}, key=len, reverse=True)

    @functools.cached_property
    def template(self) -> Any:
        """The compiled template, compiled on first use: with a port, only a row the port leaves to Jinja needs it."""
        return compile_template(self.spec.chat_template)

    def _tools(self, tools: Any) -> Any:
        """The `tools` argument as transformers takes it: JSON schemas, or functions turned into schemas."""
        if tools is None:
            return None
        out = []
        for tool in tools:
            if isinstance(tool, dict):
                out.append(tool)
            elif callable(tool):
                out.append(self._schema(tool))
            else:
                what = type(tool).__name__
                raise TemplateError(f"template: a `tools` entry must be a JSON schema (a dict), not {what}")
        return out

    def __call__(self, messages: Any, kwargs: Any, add_generation_prompt: bool = False) -> tuple[str, list[Any]]:
        """One conversation -> (text, generation spans), as `apply_chat_template` renders it: through the template's
        exact port when it has one and the row is one the port handles, else through Jinja."""
        port = self.port
        if port is not None:
            out = port(messages, row_kwargs(self.spec, kwargs), add_generation_prompt)
            if out is not None:
                self.fast_rows += 1
                return out
        self.jinja_rows += 1
        return self.render_jinja(messages, kwargs, add_generation_prompt)

    def render_jinja(self, messages: Any, kwargs: Any, add_generation_prompt: bool = False) -> tuple[str, list[Any]]:
        """One conversation -> (text, generation spans) through the compiled template (transformers' path)."""
        # apply_chat_template's input preparation, in one pass: drop None-valued keys, rebuild from plain types, then
        # alias reasoning fields (a no-op unless a message has one, so it is skipped then).
        slow, reasoning = self._slow_plain, False
        if any(type(m) is not dict for m in messages):  # dataclasses, pydantic objects: transformers' conversion
            messages = self._to_dicts(messages)
        chat = []
        for m in messages:
            msg = {}
            for k, v in m.items():
                if v is not None:
                    msg[k if type(k) is str else slow(k)] = _plain_data(v, slow)
                    reasoning = reasoning or k in self._reasoning_keys
            chat.append(msg)
        if reasoning:
            chat = self._alias(chat)
        kw = row_kwargs(self.spec, kwargs)
        keys = frozenset(kw)
        if keys not in self._checked_keys:
            clash = sorted(keys & self._reserved)
            if clash:
                raise TemplateError(
                    f"template: chat_template_kwargs keys {clash} are arguments of apply_chat_template, not template "
                    "variables. Remove them from the rows' chat_template_kwargs"
                )
            self._checked_keys.add(keys)
        tools = self._plain(self._tools(kw.pop("tools", None)))
        documents = self._plain(kw.pop("documents", None))
        add_generation_prompt = bool(kw.pop("add_generation_prompt", add_generation_prompt))
        variables = {**self._base, **self._plain(kw)}
        text, spans = self._render(self.template, chat, tools, documents, add_generation_prompt, **variables)
        return text, spans

    def _generation_prompts(self) -> tuple[list[str], str | None]:
        """The template's generation prompts (one per reasoning mode), longest first, and their common prefix: the
        assistant header ("<|im_start|>assistant\\n"). Found by rendering a one-user-turn probe with and without
        add_generation_prompt, so nothing about the template's syntax is assumed."""
        probe = [{"role": "user", "content": _PROBE}]
        prompts = set()
        for thinking in (True, False):
            try:
                kw = {"enable_thinking": thinking}
                bare, _ = self(probe, kw)
                prompted, _ = self(probe, kw, add_generation_prompt=True)
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

    # ----------------------------------------------------------------------------------------------- train_on
    def adjust_spans(self, text: str, spans: list[Any]) -> list[tuple[int, int]]:
        """Spans after template.train_on: whatever the markers wrap, `content` keeps the assistant content + its
        end-of-turn token, `content_and_header` adds the turn's header and empty think block before it."""
        out: list[tuple[int, int]] = []
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


def render(spec: RenderSpec, messages: Any, kwargs: Any) -> tuple[str, list[tuple[int, int]]]:
    """One conversation -> (text, assistant character spans after template.train_on)."""
    r = renderer(spec)
    text, spans = r(messages, kwargs)
    return text, r.adjust_spans(text, spans)


# ---------------------------------------------------------------------------------------------------- tokenising
def _component_types(node: Any) -> list[dict[str, Any]]:
    """Every component of a tokenizer.json normalizer/pre_tokenizer (Sequence flattened)."""
    if not isinstance(node, dict):
        return []
    subs = node.get("normalizers") or node.get("pretokenizers")
    if subs is not None:
        return [c for s in subs for c in _component_types(s)]
    return [node]


class PieceTokenizer:
    """Encodes texts by their pieces between added tokens, each distinct piece once (see the module docstring)."""

    def __init__(self, tokenizer: Any) -> None:
        self.backend = tokenizer.backend_tokenizer
        spec = json.loads(self.backend.to_str())
        added = spec.get("added_tokens") or []
        self.reason = self._plain_path_reason(spec, added)
        self.piecewise = self.reason is None
        self.cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.split_re: re.Pattern[str] | None = None
        self.special: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if self.piecewise and added:
            contents = sorted({a["content"] for a in added}, key=len, reverse=True)
            # Leftmost, and at one position the longest token first: the Rust splitter's LeftmostLongest rule.
            self.split_re = re.compile("(" + "|".join(re.escape(c) for c in contents) + ")")
            for a in added:
                self.special[a["content"]] = (
                    np.asarray([a["id"]], dtype=np.int32),
                    np.asarray([[0, len(a["content"])]], dtype=np.int64),
                )
        self.words_re = self._words_re(spec) if self.piecewise and WORD_SPLIT else None
        self.words: dict[str, list[str]] = {}  # piece -> its words (itself when it is not cut)

    def _words_re(self, spec: dict[str, Any]) -> re.Pattern[str] | None:
        """The GPT-2 pre-tokenizer split, for pieces of printable ASCII (+ tab, newline, carriage return) only, when
        the tokenizer is exactly: no normaliser, a ByteLevel pre-tokenizer with its regex and no prefix space, BPE.

        Such a tokenizer splits a piece with that regex and encodes each match (a word) on its own, so a piece's
        tokens are its words' tokens one after the other, and each distinct word need be encoded once. On that
        alphabet the classes of the Rust regex (\\p{L}, \\p{N}, \\s) are exactly [A-Za-z], [0-9], [\\t\\n\\r ]: no
        Unicode-table difference between the two regex engines can arise. The Rust tokenizer itself is the check:
        a probe of tricky text must encode the same both ways, else pieces are encoded whole."""
        pre = spec.get("pre_tokenizer") or {}
        if spec.get("normalizer") is not None or (spec.get("model") or {}).get("type") != "BPE":
            return None
        if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
            return None
        words = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")
        probe = "It's  a\n\n test 123abc 'll'LL 're x'd \t\r\n  y!! ?? ..(a) {\"k\": [1, 2.5]}\n \n\n  z  "
        whole = self.backend.encode(probe, add_special_tokens=False)
        ids, offs, pos = [], [], 0
        for w in words.findall(probe):
            e = self.backend.encode(w, add_special_tokens=False)
            ids += e.ids
            offs += [(a + pos, b + pos) for a, b in e.offsets]
            pos += len(w)
        if pos != len(probe) or ids != whole.ids or offs != [tuple(o) for o in whole.offsets]:
            return None
        return words

    def _plain_path_reason(self, spec: dict[str, Any], added: list[dict[str, Any]]) -> str | None:
        """Why pieces between added tokens could encode differently alone than in context (None: they cannot)."""
        if getattr(self.backend, "encode_special_tokens", False):
            return "split_special_tokens is on"
        for a in added:
            if a.get("lstrip") or a.get("rstrip") or a.get("single_word"):
                return f"added token {a['content']!r} strips whitespace or matches single words"
            if a.get("normalized") and spec.get("normalizer") is not None:
                return f"added token {a['content']!r} is matched after normalisation"
        for comp in _component_types(spec.get("pre_tokenizer")):
            if comp.get("type") == "Metaspace" and comp.get("prepend_scheme", "always") == "first":
                return "the Metaspace pre-tokenizer prepends only to the first piece"
        if (spec.get("model") or {}).get("dropout"):
            return "BPE dropout is on"
        return None

    def _encode_new(self, pieces: list[str]) -> None:
        """Encode pieces not seen yet (one batched Rust call) into the cache, as views of two flat arrays."""
        encs = self.backend.encode_batch(pieces, add_special_tokens=False)
        lens = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
        ends = np.cumsum(lens)
        total = int(ends[-1]) if len(ends) else 0
        ids = np.fromiter(chain.from_iterable(e.ids for e in encs), dtype=np.int32, count=total)
        offs = np.fromiter(chain.from_iterable(chain.from_iterable(e.offsets for e in encs)), np.int64, 2 * total)
        offs = offs.reshape(-1, 2)
        for p, b, n in zip(pieces, ends.tolist(), lens.tolist()):
            self.cache[p] = (ids[b - n : b], offs[b - n : b])

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """texts -> (flat ids int32, flat char offsets (n, 2) within each text, row offsets into the flat arrays)."""
        if not self.piecewise:
            encs = self.backend.encode_batch(texts, add_special_tokens=False)
            lens = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
            total = int(lens.sum())
            ids = np.fromiter(chain.from_iterable(e.ids for e in encs), dtype=np.int32, count=total)
            offs = np.fromiter(chain.from_iterable(chain.from_iterable(e.offsets for e in encs)), np.int64, 2 * total)
            return ids, offs.reshape(-1, 2), np.concatenate([[0], np.cumsum(lens)])
        if len(self.cache) > _PIECE_CACHE_MAX:
            self.cache.clear()
        if len(self.words) > _PIECE_CACHE_MAX:
            self.words.clear()
        cache, special = self.cache, self.special
        # Cut every text at its added tokens; number the batch's distinct pieces (a piece's code is its position in
        # `index`); all per-piece work below is then done once per distinct piece, and per-part work in numpy.
        split = self.split_re.split if self.split_re is not None else (lambda t: [t])
        rows = [split(t) for t in texts]
        if self.words_re is not None:  # pieces of the safe alphabet cut further into their words (see _words_re)
            words, unsafe, memo = self.words_re.findall, _UNSAFE_FOR_WORDS.search, self.words
            for p in dict.fromkeys(chain.from_iterable(rows)):  # each distinct piece of the batch once
                w = memo.get(p)
                if w is None:  # first seen: its words (most pieces are one row's content, seen once)
                    memo[p] = [p] if p in special or unsafe(p) else words(p)
                elif len(w) > 1:  # seen again (a header, a tool list): encoded whole from now on, one part
                    memo[p] = [p]
            get = memo.__getitem__
            rows = [list(chain.from_iterable(map(get, r))) or [""] for r in rows]
        parts = list(chain.from_iterable(rows))
        uniq = list(dict.fromkeys(parts))  # distinct pieces, in first-seen order
        index = dict(zip(uniq, range(len(uniq))))
        codes = np.fromiter(map(index.__getitem__, parts), dtype=np.int64, count=len(parts))
        missing = [p for p in uniq if p and p not in special and p not in cache]
        if missing:
            self._encode_new(missing)
        empty = (np.zeros(0, np.int32), np.zeros((0, 2), np.int64))
        table = [special.get(p) or cache.get(p) or empty for p in uniq]  # a special token wins over a text piece
        u_len = np.fromiter((len(t[0]) for t in table), dtype=np.int64, count=len(table))
        u_start = np.concatenate([[0], np.cumsum(u_len)[:-1]])
        u_ids = np.concatenate([t[0] for t in table]) if table else empty[0]
        u_offs = np.concatenate([t[1] for t in table]) if table else empty[1]
        # per part: its tokens (from the distinct-piece table) and its character position within its row
        tok_len = u_len[codes]
        char_len = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
        parts_per_row = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        row_first_part = np.concatenate([[0], np.cumsum(parts_per_row)[:-1]])
        char_end = np.cumsum(char_len)
        char_pos = char_end - char_len - np.repeat(char_end[row_first_part] - char_len[row_first_part], parts_per_row)
        tok_end = np.cumsum(tok_len)
        total = int(tok_end[-1]) if len(tok_end) else 0
        gather = np.arange(total, dtype=np.int64) + np.repeat(u_start[codes] - (tok_end - tok_len), tok_len)
        ids = u_ids[gather]
        offs = u_offs[gather] + np.repeat(char_pos, tok_len)[:, None]
        row_tokens = np.add.reduceat(tok_len, row_first_part) if len(parts) else np.zeros(len(rows), np.int64)
        return ids, offs, np.concatenate([[0], np.cumsum(row_tokens)])


_PIECES: dict[int, tuple[Any, PieceTokenizer]] = {}


def piece_tokenizer(tokenizer: Any) -> PieceTokenizer:
    entry = _PIECES.get(id(tokenizer))
    if entry is None or entry[0] is not tokenizer:
        entry = _PIECES[id(tokenizer)] = (tokenizer, PieceTokenizer(tokenizer))
    return entry[1]


# ------------------------------------------------------------------------------------------------------- the mask
def spans_mask(offsets: np.ndarray, row_offsets: np.ndarray, spans: list[list[tuple[int, int]]]) -> np.ndarray:
    """transformers' assistant-mask rule for a batch: offsets are char offsets within each row's text."""
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


def _spans_mask_loop(offsets: np.ndarray, row_offsets: np.ndarray, spans: list[list[tuple[int, int]]]) -> np.ndarray:
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


# -------------------------------------------------------------------------------------------------- the batch API
@dataclass
class Encoded:
    """A batch of conversations, tokenised: flat arrays + row offsets (row i is [row_offsets[i], row_offsets[i+1]))."""

    texts: list[str]
    spans: list[list[tuple[int, int]]]  # after template.train_on (raw marker spans when raw=True)
    ids: np.ndarray  # int32
    offsets: np.ndarray  # int64 (n, 2): character offsets within the row's text
    masks: np.ndarray  # int8
    row_offsets: np.ndarray  # int64, rows + 1
    piecewise: bool = field(default=True)

    def __len__(self) -> int:
        return len(self.texts)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = int(self.row_offsets[i]), int(self.row_offsets[i + 1])
        return self.ids[a:b], self.offsets[a:b], self.masks[a:b]


def encode_conversations(
    spec: RenderSpec, tokenizer: Any, messages: list[Any], kwargs: list[Any] | None = None, raw: bool = False
) -> Encoded:
    """Render + tokenise + mask a batch. raw=True keeps the spans exactly as the markers give them (the mask is then
    transformers' own, whatever train_on says)."""
    r = renderer(spec)
    kwargs = kwargs if kwargs is not None else [None] * len(messages)
    texts, spans = [], []
    for m, k in zip(messages, kwargs):
        text, sp = r(m, k)
        texts.append(text)
        spans.append([(int(s), int(e)) for s, e in sp] if raw else r.adjust_spans(text, sp))
    pt = piece_tokenizer(tokenizer)
    ids, offsets, row_offsets = pt.encode(texts)
    masks = spans_mask(offsets, row_offsets, spans)
    return Encoded(texts, spans, ids, offsets, masks, row_offsets, pt.piecewise)


def tokenize_conversations(
    spec: RenderSpec, tokenizer: Any, messages: list[Any], kwargs: list[Any] | None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A batch of conversations -> (input_ids per row, assistant mask per row), untruncated."""
    enc = encode_conversations(spec, tokenizer, messages, kwargs)
    bounds = enc.row_offsets.tolist()
    ids, masks = enc.ids, enc.masks
    return [ids[a:b] for a, b in zip(bounds, bounds[1:])], [masks[a:b] for a, b in zip(bounds, bounds[1:])]
