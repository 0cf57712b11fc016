"""The fast path: exact pure-Python stand-ins for two costs of preparing chat data, each proven identical to the
library code it replaces (tests/test_template.py; the template check re-checks samples of every source at run time).

1. Ports of the two shipped templates (assets/templates/smollm3.jinja, chatml.jinja): `port_for(template)` returns
   a function giving, for a row it handles, the very (text, generation spans) that transformers'
   `render_jinja_template(..., return_assistant_tokens_mask=True)` gives, without running the template body. A port
   is used only for the exact template text it reproduces (SHA-256 pinned below) and only for rows of plain inputs it
   knows (plain-dict messages of known roles and keys, known kwargs of known types, plain JSON tool lists); it returns
   None for anything else, and the caller renders that row with Jinja.
2. `PieceTokenizer`: the Rust tokenizer cuts a text at its added tokens and encodes each piece between them on its
   own, so a rendered text is cut the same way here and each distinct piece (system header, persona, tool list, role
   header) is encoded once and cached. With a byte-level BPE tokenizer a new ASCII piece is further cut into the
   GPT-2 pre-tokenizer's words, each distinct word encoded once (a probe checks that split against the Rust
   tokenizer). A tokenizer whose pieces are not independent is not piecewise; the caller then encodes whole texts.

SFT_EXP_FAST_RENDER=0 turns both off (`ENABLED`: every row is rendered by transformers and encoded whole);
SFT_EXP_WORD_SPLIT=0 turns off only the word split.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from datetime import datetime
from itertools import chain
from typing import Any

import numpy as np

ENABLED = os.environ.get("SFT_EXP_FAST_RENDER", "1") != "0"
WORD_SPLIT = os.environ.get("SFT_EXP_WORD_SPLIT", "1") != "0"

# SHA-256 of the UTF-8 text of the shipped templates each port reproduces, branch for branch.
SMOLLM3_SHA256 = "4e5f20b6480be75dd48b553dbf37f701934701face94482d70a63356fb042bd9"
CHATML_SHA256 = "4e76598a11788ecef7962a3c432c2fa77f400b4c9803471f6d85dd3845d9271c"
SMOLLM3_RECIPE_SHA256 = "a0d9f492b37f709318808ea6c8aa480da2e96110039db073fc092da25ba2a0c4"

# (text, generation spans) or None: the row is not one the port handles.
Port = Callable[[Any, dict[str, Any], bool], "tuple[str, list[tuple[int, int]]] | None"]

START, END = "<|im_start|>", "<|im_end|>"
EMPTY_THINK = "<think>\n\n</think>\n"
# Message keys the templates never read (with any plain JSON value): tool_calls, names, the reasoning fields and
# their aliases (transformers' _alias_reasoning_fields only adds more of them).
# ("train": sft-exp's flag on a prompt_completion row's turns, sft_exp.data.formats.TRAIN_KEY; templates ignore it)
_IGNORED_KEYS = frozenset({"tool_calls", "name", "tool_call_id", "reasoning_content", "thinking", "reasoning", "train"})
_SMOLLM3_ROLES = frozenset({"system", "user", "assistant", "tool"})
_SCALARS = (str, int, float, bool)


class _Unsupported(Exception):
    """A value the port does not render: the row goes to the Jinja render."""


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _plain(value: Any) -> bool:
    """True when value is made only of exact plain JSON types (dict with str keys, list, str, int, float, bool,
    None)."""
    tp = type(value)
    if tp in _SCALARS or value is None:
        return True
    if tp is dict:
        return all(type(k) is str and _plain(v) for k, v in value.items())
    if tp is list:
        return all(_plain(v) for v in value)
    return False


def _tojson(value: Any) -> str:
    """transformers' `tojson` filter with its defaults."""
    return json.dumps(value, ensure_ascii=False)


def _clean(value: Any) -> Any:
    """value with the none-valued keys of its mappings left out, at every level; _Unsupported for anything that is
    not made of exact plain JSON types (dict with str keys, list, str, int, float, bool, None)."""
    tp = type(value)
    if tp is dict:
        out = {}
        for k, v in value.items():
            if v is None:
                continue
            if type(k) is not str:
                raise _Unsupported
            out[k] = _clean(v)
        return out
    if tp is list:
        return [_clean(v) for v in value]
    if tp in _SCALARS or value is None:
        return value
    raise _Unsupported


def _render_json(value: Any) -> str:
    """smollm3.jinja's `render_json` macro: mappings with none-valued keys left out, strings and scalars as JSON
    (`tojson`), lists element-wise; both joined with ", " and ": ". json.dumps with its default separators writes
    exactly that for the value with its none-valued keys removed (str keys only, so `tojson(key)` is the key as
    json.dumps writes it)."""
    return _tojson(_clean(value))


def _messages(messages: Any, roles: frozenset[str] | None) -> list[tuple[str, str | None]] | None:
    """[(role, content or None)] when every message is one the port handles, else None."""
    if type(messages) is not list:
        return None
    out = []
    for m in messages:
        if type(m) is not dict:
            return None
        if len(m) == 2 and "role" in m and "content" in m:  # the common message: role + content only
            role, content = m["role"], m["content"]
            if (content is not None and type(content) is not str) or type(role) is not str:
                return None
            if roles is not None and role not in roles:
                return None
            out.append((role, content))
            continue
        role = content = None
        for k, v in m.items():
            if v is None:
                continue  # apply_chat_template drops None-valued keys
            if k == "role":
                role = v
            elif k == "content":
                if type(v) is not str:
                    return None
                content = v
            elif k not in _IGNORED_KEYS or not _plain(v):
                return None
        if type(role) is not str or (roles is not None and role not in roles):
            return None
        out.append((role, content))
    return out


# ─────────────────────────────────────────────────────────────────────────────────────────────────────── smollm3
# kwargs the smollm3 port renders -> the types it accepts (None values never reach it: row_kwargs drops them)
_SMOLLM3_KWARGS: dict[str, tuple[type, ...]] = {
    "enable_thinking": (bool, type(None)),  # None: the config's default when that is None
    "date_string": (str,),
    "custom_instructions": (str,),
    "xml_tools": (str, list),
    "python_tools": (str, list),
    "tools": (list,),
    "add_generation_prompt": (bool,),
}
_TOOLS_PREAMBLE = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n\n<tools>\n"
)
_TOOLS_CLOSE = (
    "</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags."
)
_THINK_PERSONA = (
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face. Your role as an assistant involves "
    "thoroughly exploring questions through a systematic thinking process before providing the final precise and "
    "accurate solutions. This requires engaging in a comprehensive cycle of analysis, summarizing, exploration, "
    "reassessment, reflection, backtracking, and iteration to develop well-considered thinking process. Please "
    "structure your response into two main sections: Thought and Solution using the specified format: <think> "
    "Thought section </think> Solution section. In the Thought section, detail your reasoning process in steps. Each "
    "step should include detailed considerations such as analysing questions, summarizing relevant findings, "
    "brainstorming new ideas, verifying the accuracy of the current steps, refining any errors, and revisiting "
    "previous steps. In the Solution section, based on various attempts, explorations, and reflections from the "
    "Thought section, systematically present the final solution that you deem correct. The Solution section should "
    "be logical, accurate, and concise and detail necessary steps needed to reach the conclusion.\n\n"
)
_NO_THINK_PERSONA = "You are a helpful AI assistant named SmolLM, trained by Hugging Face.\n\n"


def _tool_item(tool: Any) -> str:
    """`{% if tool is string %}{{ tool }}{% else %}{{ render_json(tool) }}{% endif %}`."""
    return tool if type(tool) is str else _render_json(tool)


def _smollm3_system(msgs: list[tuple[str, str | None]], kw: dict[str, Any]) -> tuple[str, str, tuple[Any, ...]]:
    """(the system turn, the reasoning mode, the tool lists it wrote)."""
    thinking = kw.get("enable_thinking")
    reasoning_mode = "/think" if thinking is None or thinking else "/no_think"
    instructions = kw.get("custom_instructions", "")
    system_message = ""
    if msgs and msgs[0][0] == "system":
        if msgs[0][1] is not None:
            system_message = msgs[0][1]
        if "/no_think" in system_message:
            reasoning_mode = "/no_think"
        elif "/think" in system_message:
            reasoning_mode = "/think"
        instructions = system_message.replace("/no_think", "").replace("/think", "").rstrip()
    if "/system_override" in system_message:
        text = START + "system\n" + instructions.replace("/system_override", "").rstrip() + END + "\n"
        return text, reasoning_mode, ()
    today = kw.get("date_string")
    if today is None:
        today = datetime.now().strftime("%d %B %Y")  # transformers' strftime_now
    out = [
        START + "system\n## Metadata\n\nKnowledge Cutoff Date: June 2025\n",
        "Today Date: " + today + "\n",
        "Reasoning Mode: " + reasoning_mode + "\n\n",
        "## Custom Instructions\n\n",
    ]
    if len(instructions) > 0:
        out.append(instructions + "\n\n")
    elif reasoning_mode == "/think":
        out.append(_THINK_PERSONA)
    else:
        out.append(_NO_THINK_PERSONA)
    xml_tool_list = xml_tool_text = None
    tools, xml_tools = kw.get("tools"), kw.get("xml_tools")
    if tools is not None and len(tools) > 0:
        xml_tool_list = tools
    elif xml_tools is not None and len(xml_tools) > 0:
        if type(xml_tools) is str:
            xml_tool_text = xml_tools
        else:
            xml_tool_list = xml_tools
    if xml_tool_list is not None:
        xml_tool_text = _TOOLS_PREAMBLE + "".join(_tool_item(t) + "\n" for t in xml_tool_list) + _TOOLS_CLOSE
    out.append("## Tools\n\n### XML Tools\n\n")
    out.append(xml_tool_text if xml_tool_text is not None else "None")
    out.append("\n\n### Python Tools\n\n")
    python_tools = kw.get("python_tools")
    if python_tools is not None and len(python_tools) > 0:
        if type(python_tools) is str:
            out.append(python_tools)
        else:
            out.append("\n".join(_tool_item(t) for t in python_tools))
    else:
        out.append("None")
    out.append("\n\n" + END + "\n")
    return "".join(out), reasoning_mode, (xml_tool_list, python_tools)


# The system turn of rows without tool lists, by everything it depends on: (system content, or _NO_SYSTEM when the
# first message is not a system message; enable_thinking; custom_instructions; date_string; xml_tools; python_tools;
# tools). Rows whose date comes from the clock are not memoised.
_NO_SYSTEM = object()
_SYSTEM_MEMO: dict[tuple[Any, ...], tuple[str, str, tuple[Any, ...]]] = {}
_SYSTEM_MEMO_MAX = 10_000


def _kwargs_ok(kw: dict[str, Any]) -> bool:
    """Every kwarg is one the ports know, of a type they render; tool lists hold plain JSON values only, and `tools`
    entries are dicts (transformers converts functions to schemas and refuses anything else: its path)."""
    for k, v in kw.items():
        types = _SMOLLM3_KWARGS.get(k)
        if types is None or type(v) not in types:
            return False
        if k == "tools" and not all(type(t) is dict for t in v):
            return False
    return True


def _unrendered_plain(kw: dict[str, Any], rendered: tuple[Any, ...]) -> bool:
    """The list kwargs a render did not write (and so did not check) are made of plain JSON types too: transformers
    rebuilds every kwarg (`_plain_template_data`) before the template runs, whatever the template reads."""
    return all(type(v) is not list or any(v is r for r in rendered) or _plain(v) for v in kw.values())


def _smollm3(
    messages: Any, kw: dict[str, Any], add_generation_prompt: bool, whole_turn: bool = False
) -> tuple[str, list[Any]] | None:
    """smollm3.jinja; whole_turn=True: smollm3_recipe.jinja, whose markers wrap the whole assistant turn (header,
    empty think block, content, end-of-turn token and newline) instead of the content + end-of-turn token."""
    if not _kwargs_ok(kw):
        return None
    msgs = _messages(messages, _SMOLLM3_ROLES)
    if msgs is None:
        return None
    g = kw.get
    key = (msgs[0][1] if msgs and msgs[0][0] == "system" else _NO_SYSTEM, g("enable_thinking"))
    key += (g("custom_instructions"), g("date_string"), g("xml_tools"), g("python_tools"), g("tools"))
    memo = key[3] is not None and not any(type(v) is list for v in key)  # no date from the clock, no list
    hit = _SYSTEM_MEMO.get(key) if memo else None
    if hit is not None:
        system, reasoning_mode, rendered = hit
    else:
        try:
            system, reasoning_mode, rendered = _smollm3_system(msgs, kw)
        except _Unsupported:
            return None
        if memo:
            if len(_SYSTEM_MEMO) > _SYSTEM_MEMO_MAX:
                _SYSTEM_MEMO.clear()
            _SYSTEM_MEMO[key] = (system, reasoning_mode, rendered)
    if not _unrendered_plain(kw, rendered):
        return None
    add_generation_prompt = kw.get("add_generation_prompt", add_generation_prompt)
    head = START + "assistant\n" + (EMPTY_THINK if reasoning_mode == "/no_think" else "")
    parts = [system]
    n = len(system)
    spans = []
    for role, content in msgs:
        if content is None:
            content = ""
        if role == "assistant":
            gen = content.lstrip("\n") + END
            piece = head + gen + "\n"
            s = n if whole_turn else n + len(head)
            spans.append((s, n + len(piece) if whole_turn else s + len(gen)))
        elif role == "system":
            continue
        else:  # user, tool
            piece = START + "user\n" + content + END + "\n"
        parts.append(piece)
        n += len(piece)
    if add_generation_prompt:
        parts.append(head)
    return "".join(parts), spans


# ──────────────────────────────────────────────────────────────────────────────────────────────────────── chatml
def _chatml(messages: Any, kw: dict[str, Any], add_generation_prompt: bool) -> tuple[str, list[Any]] | None:
    """chatml reads no kwarg but add_generation_prompt; the others the smollm3 port knows are accepted (and ignored, as
    the template ignores them), anything else goes to Jinja."""
    if not _kwargs_ok(kw) or not _unrendered_plain(kw, ()):
        return None
    add_generation_prompt = kw.get("add_generation_prompt", add_generation_prompt)
    msgs = _messages(messages, None)
    if msgs is None:
        return None
    parts = []
    n = 0
    spans = []
    for role, content in msgs:
        if content is None:
            content = ""
        if role == "assistant":
            s = n + len(START) + len("assistant\n")
            gen = content + END
            spans.append((s, s + len(gen)))
            piece = START + "assistant\n" + gen + "\n"
        else:
            piece = START + role + "\n" + content + END + "\n"
        parts.append(piece)
        n += len(piece)
    if add_generation_prompt:
        parts.append(START + "assistant\n")
    return "".join(parts), spans


def _smollm3_recipe(messages: Any, kw: dict[str, Any], add_generation_prompt: bool) -> tuple[str, list[Any]] | None:
    return _smollm3(messages, kw, add_generation_prompt, whole_turn=True)


PORTS: dict[str, Port] = {SMOLLM3_SHA256: _smollm3, SMOLLM3_RECIPE_SHA256: _smollm3_recipe, CHATML_SHA256: _chatml}
# Variables the ports assume are not set by anything else than the row (a special token of that name would be).
_READ = frozenset(_SMOLLM3_KWARGS) | {"messages", "documents", "strftime_now", "namespace"}


def port_for(chat_template: str, variables: dict[str, Any] | None = None) -> Port | None:
    """The exact port of this template text, or None (not a shipped template, ports off, or other template
    variables, e.g. special tokens, that could shadow what the template reads)."""
    if not ENABLED or not isinstance(chat_template, str):
        return None
    if variables and _READ & set(variables):
        return None
    return PORTS.get(_sha256(chat_template))


# ─────────────────────────────────────────────────────────────────────────────────────────── piece tokenisation
# Characters outside the alphabet on which the Python word split equals the Rust pre-tokenizer's (see _words_re).
_UNSAFE_FOR_WORDS = re.compile(r"[^\t\n\r\x20-\x7e]")
# Pieces kept in the tokenisation caches before they are cleared (bounds memory on sources of unique texts).
_PIECE_CACHE_MAX = 200_000


def _component_types(node: Any) -> list[dict[str, Any]]:
    """Every component of a tokenizer.json normalizer/pre_tokenizer (Sequence flattened)."""
    if not isinstance(node, dict):
        return []
    subs = node.get("normalizers") or node.get("pretokenizers")
    if subs is not None:
        return [c for s in subs for c in _component_types(s)]
    return [node]


class PieceTokenizer:
    """Encodes texts piece by piece (pieces between added tokens), each distinct piece once, through the tokenizer's
    Rust backend: the ids and character offsets of `backend_tokenizer.encode_batch(texts, add_special_tokens=False)`.

    Attributes:
        piecewise: whether `encode` may be used; False (with `reason`) when pieces could encode differently alone
            than in context, or when the fast path is off. The caller then encodes whole texts.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.backend = tokenizer.backend_tokenizer
        spec = json.loads(self.backend.to_str())
        added = spec.get("added_tokens") or []
        self.reason = "SFT_EXP_FAST_RENDER=0" if not ENABLED else self._plain_path_reason(spec, added)
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
        # hashes of the pieces seen once: a piece seen again (a header, a tool list) is encoded whole from then on.
        # Hashes, not the pieces: most pieces are one row's content, seen once, and keeping them (with their word
        # lists, as this did) grew a tokenising worker by ~5 bytes per token. A collision only encodes a piece whole,
        # which gives the same ids (see _words_re).
        self.seen: set[int] = set()

    def _words_re(self, spec: dict[str, Any]) -> re.Pattern[str] | None:
        """The GPT-2 pre-tokenizer split, for pieces of printable ASCII (+ tab, newline, carriage return) only, when
        the tokenizer is exactly: no normaliser, a ByteLevel pre-tokenizer with its regex and no prefix space, BPE.

        Such a tokenizer encodes each match of that regex (a word) on its own, so a piece's tokens are its words'
        tokens one after the other. On that alphabet the Rust regex's classes (\\p{L}, \\p{N}, \\s) are exactly
        [A-Za-z], [0-9], [\\t\\n\\r ]. A probe of tricky text must encode the same both ways, else None."""
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
            # copies: a view would keep this whole batch's arrays alive as long as any one of its pieces is cached
            self.cache[p] = (ids[b - n : b].copy(), offs[b - n : b].copy())

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Encode a batch (only when `piecewise`).

        Args:
            texts: rendered conversations.

        Returns:
            (flat ids int32, flat character offsets (n, 2) int64 within each text, row offsets int64 (len(texts) + 1)
            into the flat arrays).
        """
        if len(self.cache) > _PIECE_CACHE_MAX:
            self.cache.clear()
        if len(self.seen) > _PIECE_CACHE_MAX:
            self.seen.clear()
        cache, special = self.cache, self.special
        # Cut every text at its added tokens; number the batch's distinct pieces (a piece's code is its position in
        # `index`); all per-piece work below is then done once per distinct piece, and per-part work in numpy.
        split = self.split_re.split if self.split_re is not None else (lambda t: [t])
        rows = [split(t) for t in texts]
        if self.words_re is not None:  # pieces of the safe alphabet cut further into their words (see _words_re)
            words, unsafe, seen = self.words_re.findall, _UNSAFE_FOR_WORDS.search, self.seen
            memo: dict[str, list[str]] = {}  # this batch's pieces -> their parts
            for p in dict.fromkeys(chain.from_iterable(rows)):  # each distinct piece of the batch once
                h = hash(p)
                if p in special or unsafe(p) or h in seen or p in cache:  # seen again: encoded whole, one part
                    memo[p] = [p]
                else:  # first seen: its words (most pieces are one row's content, seen once)
                    seen.add(h)
                    memo[p] = words(p)
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


_PIECES: dict[tuple[int, bool], tuple[Any, PieceTokenizer]] = {}


def piece_tokenizer(tokenizer: Any) -> PieceTokenizer:
    """The PieceTokenizer of a tokenizer, built once per process (and per state of `ENABLED`)."""
    key = (id(tokenizer), ENABLED)
    entry = _PIECES.get(key)
    if entry is None or entry[0] is not tokenizer:
        entry = _PIECES[key] = (tokenizer, PieceTokenizer(tokenizer))
    return entry[1]
