"""Exact pure-Python renderers of the two chat templates the repo ships (assets/templates/smollm3.jinja, chatml.jinja).

A port gives, for a row it handles, the very (text, generation spans) that transformers' Jinja render with its
AssistantTracker gives (`_render_with_assistant_indices`: each span is the character range of one
`{% generation %}` block), without running the template body, which was the largest per-row cost of rendering.

When a port is used (`port_for`):
  * only for the exact template text it was written from: the SHA-256 of the template text in use must equal the
    hash of the shipped file the port reproduces (pinned below; tests/test_template.py checks the shipped files still
    hash to it). An edited or a user template, whatever its resemblance, takes the Jinja path;
  * only for rows whose every input it handles (`None` is returned otherwise, and the caller renders the row with
    Jinja): messages that are plain dicts with a string `role` among the roles the port knows, `content` a string or
    absent/None, other keys only among those the templates never read (`tool_calls`, `name`, ...) with plain JSON
    values; kwargs only among those the port knows, each of a type it renders (see `_SMOLLM3_KWARGS`); tool lists of
    plain JSON values (dicts with string keys, lists, strings, numbers, booleans, None).
The inputs a port sees are the row's raw messages and its kwargs merged over the config defaults (`row_kwargs`: None
values dropped): for the plain inputs it accepts, transformers' input preparation (None-valued message keys dropped,
`_plain_template_data`, reasoning-field aliases) changes nothing the template reads, so it is skipped.

`ENABLED` (environment variable SFT_EXP_FAST_RENDER=0 turns it off at import) switches the ports off for benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from datetime import datetime
from typing import Any

ENABLED = os.environ.get("SFT_EXP_FAST_RENDER", "1") != "0"

# SHA-256 of the UTF-8 text of the shipped templates each port reproduces, branch for branch.
SMOLLM3_SHA256 = "4e5f20b6480be75dd48b553dbf37f701934701face94482d70a63356fb042bd9"
CHATML_SHA256 = "4e76598a11788ecef7962a3c432c2fa77f400b4c9803471f6d85dd3845d9271c"

# (text, generation spans) or None: the row is not one the port handles.
Port = Callable[[Any, dict[str, Any], bool], "tuple[str, list[tuple[int, int]]] | None"]

START, END = "<|im_start|>", "<|im_end|>"
EMPTY_THINK = "<think>\n\n</think>\n"
# Message keys the templates never read (with any plain JSON value): tool_calls, names, the reasoning fields and
# their aliases (transformers' _alias_reasoning_fields only adds more of them).
_IGNORED_KEYS = frozenset({"tool_calls", "name", "tool_call_id", "reasoning_content", "thinking", "reasoning"})
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


def _smollm3(messages: Any, kw: dict[str, Any], add_generation_prompt: bool) -> tuple[str, list[Any]] | None:
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
            s = n + len(head)
            spans.append((s, s + len(gen)))
            piece = head + gen + "\n"
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


PORTS: dict[str, Port] = {SMOLLM3_SHA256: _smollm3, CHATML_SHA256: _chatml}
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
