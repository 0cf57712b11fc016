"""Data formats -> the one internal conversation form (a `messages` list of {role, content} turns), before the template.

    detect_format(columns, features, fields) -> "messages" | "sharegpt" | "alpaca" | "prompt_completion"
    to_messages(row, fmt, fields, roles) -> (messages, None) or (None, "what is wrong, naming the field")

Pure functions: no dataset, tokenizer or config is touched, so masks, packing, caching and the template check stay
one code path for every format. Formats (`mixture.sources.<name>.format`, `auto` detects from the columns):

- messages: a `messages` list of {role, content} turns (other keys, e.g. tool_calls, kept).
- sharegpt: a `conversations` list of {from, value} turns, roles human/gpt/system/tool (+ observation,
  function_response -> tool; user/assistant as they are), and an optional `system` column.
- alpaca: `instruction`, optional `input` (appended to the instruction after a blank line), `output`, optional
  `system`.
- prompt_completion: TRL's `prompt` + `completion`, both strings (-> one user turn, one assistant turn) or both lists
  of messages (the conversational form). Only the completion is trained, as TRL does: assistant turns of the prompt
  carry `TRAIN_KEY: False` and their spans are dropped from the mask (sft_exp.data.template).

`fields` renames what the data calls a column or turn key (internal name -> the data's name, e.g.
{messages: chat, role: speaker, content: text}); `roles` renames role values (the data's role -> one of system, user,
assistant, tool), over the format's own role names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")
# Bumped when a conversion changes its output: part of every source's cache key.
FORMATS_VERSION = "1"
VALID_ROLES = frozenset({"system", "user", "assistant", "tool"})
# The keys `fields` may rename: columns, and the keys of a turn.
FIELD_NAMES = frozenset(
    {"messages", "role", "content", "conversations", "from", "value", "system"}
    | {"instruction", "input", "output", "prompt", "completion", "chat_template_kwargs"}
)
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
    "function_response": "tool",
}
# A turn key: False on a prompt's assistant turns (prompt_completion), which are rendered but not trained.
TRAIN_KEY = "train"
# The role of the one turn that stands in for a row that does not fit its format; its content says why.
BAD_ROW_ROLE = "__sft_exp_bad_row__"


def check_mapping(fields: Mapping[str, str] | None, roles: Mapping[str, str] | None) -> str | None:
    """Why a `fields` / `roles` mapping is invalid, or None.

    Example:
        >>> check_mapping({"messages": "chat"}, {"bot": "assistant"}) is None
        True
        >>> check_mapping({"msgs": "chat"}, None).startswith("fields: unknown name 'msgs'")
        True
    """
    for k in fields or {}:
        if k not in FIELD_NAMES:
            return f"fields: unknown name {k!r} (known: {sorted(FIELD_NAMES)})"
    for k, v in (roles or {}).items():
        if v not in VALID_ROLES:
            return f"roles: {k!r} maps to {v!r}, not one of {sorted(VALID_ROLES)}"
    return None


def _name(fields: Mapping[str, str] | None, key: str) -> str:
    return (fields or {}).get(key, key)


def _turn_keys(features: Any) -> set[str] | None:
    """The keys of a list-of-struct column's turns, from its `datasets` feature (None when not such a column)."""
    inner = getattr(features, "feature", None)
    if inner is None and isinstance(features, list) and features:
        inner = features[0]
    return set(inner) if isinstance(inner, Mapping) else None


def detect_format(
    columns: list[str], features: Mapping[str, Any] | None = None, fields: Mapping[str, str] | None = None
) -> str:
    """The format of a source from its columns (after `fields` renaming); ValueError when none fits.

    A `conversations` column is sharegpt when its turns have `from`/`value` keys, else messages under another name.

    Example:
        >>> detect_format(["instruction", "input", "output"])
        'alpaca'
        >>> detect_format(["prompt", "completion"])
        'prompt_completion'
    """
    cols = set(columns)
    if _name(fields, "messages") in cols:
        return "messages"
    conv = _name(fields, "conversations")
    if conv in cols:
        keys = _turn_keys((features or {}).get(conv))
        if keys is not None and _name(fields, "role") in keys and _name(fields, "from") not in keys:
            return "messages"
        return "sharegpt"
    if _name(fields, "prompt") in cols and _name(fields, "completion") in cols:
        return "prompt_completion"
    if _name(fields, "instruction") in cols and _name(fields, "output") in cols:
        return "alpaca"
    raise ValueError(
        f"no known data format in columns {sorted(cols)}: messages needs 'messages', sharegpt 'conversations', "
        "alpaca 'instruction' + 'output', prompt_completion 'prompt' + 'completion'"
    )


def required_columns(fmt: str, fields: Mapping[str, str] | None = None) -> list[str]:
    """The columns a format reads (as the data names them).

    Example:
        >>> required_columns("alpaca")
        ['instruction', 'output']
    """
    need = {
        "messages": ["messages"],
        "sharegpt": ["conversations"],
        "alpaca": ["instruction", "output"],
        "prompt_completion": ["prompt", "completion"],
    }[fmt]
    return [_name(fields, c) for c in need]


def messages_column(fmt: str, columns: list[str], fields: Mapping[str, str] | None = None) -> str:
    """The column holding the turns of a messages/sharegpt source (`messages`, or `conversations` when the data
    names its messages-format turns so)."""
    name = _name(fields, "messages" if fmt == "messages" else "conversations")
    if fmt == "messages" and name not in columns and _name(fields, "conversations") in columns:
        return _name(fields, "conversations")
    return name


def _turns(
    turns: Any, field: str, role_key: str, content_key: str, role_map: Mapping[str, str], keep_other: bool
) -> tuple[list[dict[str, Any]] | None, str | None]:
    if not isinstance(turns, list) or not turns:
        return None, f"field {field!r} is empty or not a list"
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, Mapping):
            return None, f"field {field!r}: turn {i} is not a mapping"
        role, content = t.get(role_key), t.get(content_key)
        mapped = role_map.get(role, role) if isinstance(role, str) else role
        if mapped not in VALID_ROLES:
            return None, f"field {field}[{i}].{role_key}: unknown role {role!r} (valid: {sorted(role_map)})"
        if content is not None and not isinstance(content, str):
            return None, f"field {field}[{i}].{content_key} is {type(content).__name__}, not a string"
        turn = {k: v for k, v in t.items() if k not in (role_key, content_key)} if keep_other else {}
        out.append({"role": mapped, "content": content, **turn})
    return out, None


def _string(row: Mapping[str, Any], name: str, optional: bool = False) -> tuple[str | None, str | None]:
    v = row.get(name)
    if v is None and optional:
        return None, None
    if not isinstance(v, str):
        return None, f"field {name!r} is {type(v).__name__}, not a string"
    return v, None


def to_messages(
    row: Mapping[str, Any],
    fmt: str,
    fields: Mapping[str, str] | None = None,
    roles: Mapping[str, str] | None = None,
) -> tuple[list[dict[str, Any]] | None, str | None]:
    """One row of a format -> (its conversation, None), or (None, why it does not fit, naming the field).

    Example:
        >>> to_messages({"instruction": "Add", "input": "2+2", "output": "4"}, "alpaca")
        ([{'role': 'user', 'content': 'Add\\n\\n2+2'}, {'role': 'assistant', 'content': '4'}], None)
        >>> to_messages({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        ...             "sharegpt")
        ([{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}], None)
        >>> to_messages({"prompt": "2+2?", "completion": 4}, "prompt_completion")
        (None, "field 'completion' is int, not a string or a list of messages")
    """
    n = lambda key: _name(fields, key)  # noqa: E731
    user_roles = dict(roles or {})
    if fmt == "messages":
        col = n("messages") if n("messages") in row else n("conversations")
        return _turns(row.get(col), col, n("role"), n("content"), {r: r for r in VALID_ROLES} | user_roles, True)
    if fmt == "sharegpt":
        msgs, problem = _turns(
            row.get(n("conversations")), n("conversations"), n("from"), n("value"), SHAREGPT_ROLES | user_roles, False
        )
        if msgs is None:
            return None, problem
        system, problem = _string(row, n("system"), optional=True)
        if problem:
            return None, problem
        if system and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": system})
        return msgs, None
    if fmt == "alpaca":
        instruction, p1 = _string(row, n("instruction"))
        extra, p2 = _string(row, n("input"), optional=True)
        output, p3 = _string(row, n("output"))
        system, p4 = _string(row, n("system"), optional=True)
        problem = p1 or p2 or p3 or p4
        if problem:
            return None, problem
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        msgs = [{"role": "system", "content": system}] if system else []
        return [*msgs, {"role": "user", "content": user}, {"role": "assistant", "content": output}], None
    if fmt == "prompt_completion":
        prompt, completion = row.get(n("prompt")), row.get(n("completion"))
        if isinstance(prompt, str) and isinstance(completion, str):
            return [
                {"role": "user", "content": prompt, TRAIN_KEY: False},
                {"role": "assistant", "content": completion, TRAIN_KEY: True},
            ], None
        if isinstance(prompt, list) and isinstance(completion, list):
            role_map = {r: r for r in VALID_ROLES} | user_roles
            p, problem = _turns(prompt, n("prompt"), n("role"), n("content"), role_map, True)
            if p is None:
                return None, problem
            c, problem = _turns(completion, n("completion"), n("role"), n("content"), role_map, True)
            if c is None:
                return None, problem
            return [{**m, TRAIN_KEY: False} for m in p] + [{**m, TRAIN_KEY: True} for m in c], None
        for name, v in ((n("prompt"), prompt), (n("completion"), completion)):
            if not isinstance(v, (str, list)):
                return None, f"field {name!r} is {type(v).__name__}, not a string or a list of messages"
        return None, f"fields {n('prompt')!r} and {n('completion')!r} mix a string and a list of messages"
    raise ValueError(f"unknown format {fmt!r} (known: {list(FORMATS)})")


def bad_row(problem: str) -> list[dict[str, Any]]:
    """The stand-in conversation of a row that does not fit its format (`row_problem` reports `problem`)."""
    return [{"role": BAD_ROW_ROLE, "content": problem}]


def untrained_assistant_turns(messages: list[Mapping[str, Any]]) -> list[int]:
    """Indices, among a conversation's assistant turns, of those marked not to train (a prompt's assistant turns).

    Example:
        >>> untrained_assistant_turns([{"role": "assistant", "content": "a", "train": False},
        ...                            {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}])
        [0]
    """
    out, k = [], 0
    for m in messages:
        if m.get("role") == "assistant":
            if m.get(TRAIN_KEY) is False:
                out.append(k)
            k += 1
    return out
