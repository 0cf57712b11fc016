"""Render + tokenise + mask (sft_exp.data.template) and the template check (sft_exp.data.template_check).

Identity: our batched path gives, token for token and mask for mask, what transformers' apply_chat_template(...,
return_assistant_tokens_mask=True) gives, on every demo row of every source and on hand-written edge cases.
Semantics: template.train_on decides which tokens of an assistant turn are trained, wherever the markers sit.
Sandbox: templates render in an ImmutableSandboxedEnvironment; escapes fail exactly as under transformers.
Check: a template that would train on user/system/tool text, not train the end-of-turn token, or train nothing is
refused before tokenising, naming the source and row; truncation that cuts assistant turns is reported.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jinja2
import numpy as np
import pytest
from transformers import AutoTokenizer

from sft_exp.config import ASSETS, TemplateConfig, TrainOn
from sft_exp.data import fast_render
from sft_exp.data.fast_render import PieceTokenizer
from sft_exp.data.stats import truncation_report
from sft_exp.data.template import Renderer, RenderSpec, encode_conversations, renderer, row_kwargs
from sft_exp.data.template_check import check_rows, check_template, probe_row
from sft_exp.errors import TemplateError

DEMO = ASSETS / "demo"
SOURCES = sorted(p.stem for p in DEMO.glob("*.jsonl"))
TEMPLATES = {n: (ASSETS / "templates" / f"{n}.jinja").read_text() for n in ("smollm3", "chatml")}
DATE = "01 July 2025"
EOS = "<|im_end|>"
HEADER = "<|im_start|>assistant\n"
EMPTY_THINK = "<think>\n\n</think>\n"


@functools.cache
def tokenizer_with(template: str, extra_token: str | None = None) -> Any:
    """A fresh tiny tokenizer carrying `template` (cached: each test gets the same one per template)."""
    tok = AutoTokenizer.from_pretrained(ASSETS / "tiny_smollm3")
    tok.chat_template = template
    if extra_token is not None:
        from tokenizers import AddedToken

        tok.add_tokens([AddedToken(extra_token, lstrip=True)])
    return tok


def make(
    template: str = "smollm3", train_on: str = "content", eos: str = EOS, extra_token: str | None = None
) -> tuple[Any, RenderSpec]:
    text = TEMPLATES.get(template, template)
    tok = tokenizer_with(text, extra_token)
    cfg = TemplateConfig(eos_token=eos, date_string=DATE, train_on=TrainOn(train_on))
    spec = RenderSpec.build(cfg, tok)
    return tok, RenderSpec(spec.chat_template, spec.enable_thinking, spec.date_string, spec.special_tokens,
                           spec.train_on, eos)  # fmt: skip


def reference(tok: Any, spec: RenderSpec, messages: list[dict], kwargs: dict | None) -> tuple[list[int], list[int]]:
    out = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **row_kwargs(spec, kwargs)
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


def tokenize_conversations(
    spec: RenderSpec, tok: Any, messages: list[Any], kwargs: list[Any] | None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(input_ids per row, assistant mask per row) of encode_conversations."""
    enc = encode_conversations(spec, tok, messages, kwargs)
    rows = [enc.row(i) for i in range(len(enc))]
    return [ids for ids, _, _ in rows], [mask for _, _, mask in rows]


@functools.cache
def load_rows(name: str) -> tuple[list[Any], list[Any]]:
    """A demo source as the pipeline reads it (datasets' json builder, Arrow structs)."""
    from sft_exp.config import SourceConfig
    from sft_exp.data.sources import load_source

    ds = load_source(name, SourceConfig(path=str(DEMO / f"{name}.jsonl")))
    return ds["messages"], ds["chat_template_kwargs"]


def runs(tok: Any, ids: np.ndarray, mask: np.ndarray) -> list[str]:
    """The decoded text of every maximal run of trained tokens."""
    bounds = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [tok.decode(ids[a:b].tolist()) for a, b in zip(bounds[::2], bounds[1::2])]


def assistant_turns(messages: list[dict], kwargs: dict | None, template: str, train_on: str) -> list[str]:
    """What the mask must cover, turn by turn: content (+ header and empty think block) + end-of-turn token."""
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    thinking = (kwargs or {}).get("enable_thinking")
    no_think = "/no_think" in system or ("/think" not in system and thinking is False)
    out = []
    for m in messages:
        if m["role"] != "assistant":
            continue
        content = m["content"].lstrip("\n") if template == "smollm3" else m["content"]
        head = HEADER + (EMPTY_THINK if no_think and template == "smollm3" else "")
        out.append((head if train_on == "content_and_header" else "") + content + EOS)
    return out


# ───── identity with transformers ─────


@pytest.mark.parametrize("template", ["smollm3", "chatml"])
@pytest.mark.parametrize("name", SOURCES)
def test_identical_to_apply_chat_template_on_every_demo_row(template: str, name: str) -> None:
    tok, spec = make(template)
    messages, kwargs = load_rows(name)
    for start in range(0, len(messages), 512):  # the pipeline's batch size
        ids, masks = tokenize_conversations(spec, tok, messages[start : start + 512], kwargs[start : start + 512])
        for i, (row_ids, row_mask) in enumerate(zip(ids, masks)):
            ref_ids, ref_mask = reference(tok, spec, messages[start + i], kwargs[start + i])
            assert row_ids.tolist() == ref_ids, (name, start + i)
            assert row_mask.tolist() == ref_mask, (name, start + i)


def test_docstring_example_runs() -> None:
    import doctest

    from sft_exp.data import template

    result = doctest.testmod(template, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, result


TOOL = {
    "name": "get_time",
    "description": "Get the local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CALL = '<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>'

EDGE_CASES: list[tuple[str, list[dict[str, Any]], dict[str, Any] | None]] = [
    (
        "multi_turn",
        [
            {"role": "user", "content": "Sort: 3, 1, 2"},
            {"role": "assistant", "content": "1, 2, 3"},
            {"role": "user", "content": "Reverse it."},
            {"role": "assistant", "content": "3, 2, 1"},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "<think>\nPolite.\n</think>\nYou're welcome!"},
        ],
        {"enable_thinking": True},
    ),
    (
        "system_think_flag_over_kwargs",
        [
            {"role": "system", "content": "Be brief. /think"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\n2+2=4\n</think>\n4"},
        ],
        {"enable_thinking": False},
    ),
    (
        "system_no_think_flag",
        [
            {"role": "system", "content": "/no_think You convert units."},
            {"role": "user", "content": "1 km in m?"},
            {"role": "assistant", "content": "1000 m"},
        ],
        {"enable_thinking": True},
    ),
    (
        "system_override",
        [
            {"role": "system", "content": "You are a pirate. /system_override /no_think"},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Arr."},
        ],
        None,
    ),
    (
        "tool_turns_xml_tools",
        [
            {"role": "user", "content": "Time in Oslo?"},
            {"role": "assistant", "content": CALL},
            {"role": "tool", "content": '{"time": "09:15"}'},
            {"role": "assistant", "content": "It is 09:15."},
        ],
        {"enable_thinking": False, "xml_tools": [TOOL]},
    ),
    (
        "tool_turns_tools_argument",
        [
            {"role": "user", "content": "Time in Oslo?"},
            {"role": "assistant", "content": CALL},
            {"role": "tool", "content": '{"time": "09:15"}'},
            {"role": "assistant", "content": "It is 09:15."},
        ],
        {"enable_thinking": False, "tools": [TOOL]},
    ),
    (
        "none_valued_struct_kwargs",
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
        {"enable_thinking": None, "xml_tools": None, "python_tools": None, "custom_instructions": None},
    ),
    (
        "none_valued_message_keys_and_reasoning",
        [
            {"role": "user", "content": "Hi", "tool_calls": None, "name": None},
            {"role": "assistant", "content": "Hello.", "tool_calls": None, "reasoning_content": "greet"},
        ],
        {"enable_thinking": False, "date_string": "24 December 2030"},
    ),
    (
        "unicode",
        [
            {"role": "system", "content": "Réponds en français. Ünïcödé ✓"},
            {"role": "user", "content": "👍🏽 日本語のテキスト e\u0301 مرحبا \u200d\u2028 tab\there\u00a0nbsp"},
            {"role": "assistant", "content": "D'accord 👍🏽: 日本語 — «ok» ∑ 𝔘𝔫𝔦 e\u0301\r\nfin  "},
        ],
        {"enable_thinking": False},
    ),
    (
        "special_token_text_in_content",
        [
            {"role": "user", "content": "What does <|im_end|> mean? And <think>?"},
            {"role": "assistant", "content": "\n\nIt ends a turn: <|im_end|> is a special token. <tool_call>x"},
        ],
        {"enable_thinking": True},
    ),
    (
        "empty_and_blank_user_turns",
        [
            {"role": "user", "content": ""},
            {"role": "assistant", "content": "Hmm?"},
            {"role": "user", "content": "   \n "},
            {"role": "assistant", "content": " spaced "},
        ],
        {},
    ),
    (
        "consecutive_assistant_turns",
        [
            {"role": "user", "content": "Count to two."},
            {"role": "assistant", "content": "One."},
            {"role": "assistant", "content": "Two."},
        ],
        {"enable_thinking": False},
    ),
    (
        "long_content",
        [
            {"role": "user", "content": " ".join(f"word{i % 97}" for i in range(1500))},
            {"role": "assistant", "content": "\n".join(f"line {i}: {'x' * (i % 13)}" for i in range(300))},
        ],
        None,
    ),
]


@pytest.mark.parametrize("template", ["smollm3", "chatml"])
def test_identical_on_edge_cases(template: str) -> None:
    tok, spec = make(template)
    messages = [m for _, m, _ in EDGE_CASES]
    kwargs = [k for _, _, k in EDGE_CASES]
    batch = tokenize_conversations(spec, tok, messages, kwargs)  # all in one batch ...
    for i, (name, m, k) in enumerate(EDGE_CASES):
        ref_ids, ref_mask = reference(tok, spec, m, k)
        alone = tokenize_conversations(spec, tok, [m], [k])  # ... and each alone
        for ids, mask in ((batch[0][i], batch[1][i]), (alone[0][0], alone[1][0])):
            assert ids.tolist() == ref_ids, name
            assert mask.tolist() == ref_mask, name


def test_arrow_none_filled_rows_behave_as_absent() -> None:
    """Rows read back through Arrow (missing struct keys filled with None, at every level) give the tokens of the raw
    rows: None kwargs fall back to the config, None message keys are dropped, as apply_chat_template drops them."""
    import datasets

    tok, spec = make("smollm3")
    raw = [(m, k) for name, m, k in EDGE_CASES if name.startswith(("tool_turns_xml", "multi_turn", "system_no"))]
    arrow = datasets.Dataset.from_list([{"messages": m, "chat_template_kwargs": k} for m, k in raw])
    assert arrow[1]["chat_template_kwargs"]["xml_tools"] is None  # Arrow filled it in
    ids, masks = tokenize_conversations(spec, tok, arrow["messages"], arrow["chat_template_kwargs"])
    for (m, k), row_ids, row_mask in zip(raw, ids, masks):
        ref_ids, ref_mask = reference(tok, spec, m, k)
        assert row_ids.tolist() == ref_ids and row_mask.tolist() == ref_mask
    # and TRL's way (the None-valued struct passed on as is) renders the same text with the repo's template
    out = tok.apply_chat_template(
        arrow[1]["messages"], tokenize=False, date_string=DATE, **arrow[1]["chat_template_kwargs"]
    )
    assert out == tok.apply_chat_template(raw[1][0], tokenize=False, date_string=DATE, **raw[1][1])


def test_plain_path_for_tokenizers_whose_pieces_are_not_independent() -> None:
    """An added token that strips whitespace makes pieces depend on their neighbours: whole texts are encoded then,
    and the result is still identical."""
    tok, spec = make("chatml", extra_token="<x>")
    pt = PieceTokenizer(tok)
    assert not pt.piecewise and "strips whitespace" in pt.reason
    assert PieceTokenizer(make("chatml")[0]).piecewise
    rows = [[{"role": "user", "content": "a   <x> b"}, {"role": "assistant", "content": "c <x>  d"}]]
    enc = encode_conversations(spec, tok, rows, [None])
    assert not enc.piecewise
    ref_ids, ref_mask = reference(tok, spec, rows[0], None)
    assert enc.ids.tolist() == ref_ids and enc.masks.tolist() == ref_mask


# ───── the exact ports of the shipped templates (sft_exp.data.fast_render) ─────


def test_ports_are_pinned_to_the_shipped_template_texts() -> None:
    """Each port reproduces one exact template text: editing a shipped template must come with its port's update."""
    assert fast_render._sha256(TEMPLATES["smollm3"]) == fast_render.SMOLLM3_SHA256
    assert fast_render._sha256(TEMPLATES["chatml"]) == fast_render.CHATML_SHA256
    for name in TEMPLATES:
        assert renderer(make(name)[1]).port is not None, name


@pytest.mark.parametrize("template", ["smollm3", "chatml"])
def test_demo_rows_take_the_port(template: str) -> None:
    """Every demo row is rendered by the port, not by Jinja (the renderer counts the rows of each path)."""
    tok, spec = make(template)
    r = renderer(spec)
    fast, slow = r.fast_rows, r.jinja_rows
    n = 0
    for name in SOURCES:
        messages, kwargs = load_rows(name)
        for start in range(0, len(messages), 512):
            encode_conversations(spec, tok, messages[start : start + 512], kwargs[start : start + 512])
        n += len(messages)
    assert r.fast_rows - fast == n and r.jinja_rows == slow


def _spec_thinking(template: str, thinking: bool | None) -> tuple[Any, RenderSpec]:
    tok, spec = make(template)
    return tok, RenderSpec(
        spec.chat_template, thinking, spec.date_string, spec.special_tokens, spec.train_on, spec.eos_token
    )  # type: ignore[arg-type]


def _assert_port_equals_jinja(r: Renderer, messages: Any, kwargs: Any, agp: bool = False, what: Any = None) -> None:
    """Rows (a batch) rendered by the port == the same rows rendered by transformers' render_jinja_template."""
    texts, spans = r.render(messages, kwargs, agp, use_port=False)
    for i, (m, k) in enumerate(zip(messages, kwargs)):
        got = r.port(m, row_kwargs(r.spec, k), agp)
        assert got is not None, ("the port refused", what, i)
        assert got[0] == texts[i], (what, i)
        assert [tuple(s) for s in got[1]] == [tuple(s) for s in spans[i]], (what, i)


@pytest.mark.parametrize("thinking", [True, False, None])
@pytest.mark.parametrize("template", ["smollm3", "chatml"])
def test_port_equals_jinja_on_every_demo_row(template: str, thinking: bool | None) -> None:
    """(text, generation spans) of the port == the Jinja render with transformers' AssistantTracker, on every demo row
    with the row's enable_thinking replaced by `thinking` (None: neither the row nor the config says)."""
    _, spec = _spec_thinking(template, thinking)
    r = renderer(spec)
    assert r.port is not None
    for name in SOURCES:
        messages, kwargs = load_rows(name)
        for agp in (False, True):  # the generation prompt on every 7th row
            rows = [i for i in range(len(messages)) if (i % 7 == 0) == agp]
            kws = [{**(kwargs[i] or {}), "enable_thinking": thinking} for i in rows]
            _assert_port_equals_jinja(r, [messages[i] for i in rows], kws, agp, name)


SCHEMA = {
    "name": "lookup",
    "description": 'Ünïcödé \u2014 "quoted" \\\\ back\\nslash',
    "parameters": {
        "type": "object",
        "properties": {"q": {"type": "string", "enum": ["a", None, "b"]}, "n": {"type": "integer", "default": None}},
        "required": ["q"],
        "extra": [1, 2.5, True, False, None, [], {}, {"deep": None}],
    },
    "strict": None,
}
# Rows for the branches of the templates the demo rows do not reach; the port handles every one of them.
PORT_CASES: list[tuple[str, list[dict[str, Any]], dict[str, Any] | None]] = [
    ("custom_instructions_think", [{"role": "user", "content": "hi"}], {"custom_instructions": "Be terse."}),
    (
        "custom_instructions_no_think",
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        {"custom_instructions": "Be terse.  \n", "enable_thinking": False},
    ),
    ("custom_instructions_empty", [{"role": "user", "content": "hi"}], {"custom_instructions": ""}),
    (
        "system_replaces_custom_instructions",
        [{"role": "system", "content": "Sys. /think"}, {"role": "user", "content": "a"}],
        {"custom_instructions": "ignored", "enable_thinking": False},
    ),
    (
        "system_both_flags",
        [{"role": "system", "content": "/think and /no_think"}, {"role": "assistant", "content": "\n\nx"}],
        None,
    ),
    ("system_only_flag", [{"role": "system", "content": "  /no_think  "}, {"role": "user", "content": "q"}], None),
    (
        "system_override_think",
        [{"role": "system", "content": "Raw system. /system_override /think  "}, {"role": "user", "content": "q"}],
        {"enable_thinking": False, "xml_tools": "ignored"},
    ),
    ("system_without_content", [{"role": "system"}, {"role": "user", "content": "q"}], {"custom_instructions": "c"}),
    ("system_content_none", [{"role": "system", "content": None}, {"role": "assistant", "content": "x"}], None),
    (
        "system_not_first",
        [{"role": "user", "content": "q"}, {"role": "system", "content": "late /no_think"}],
        {"enable_thinking": True},
    ),
    ("no_messages", [], {"enable_thinking": False}),
    ("xml_tools_string", [{"role": "user", "content": "q"}], {"xml_tools": "<tools>raw</tools>"}),
    ("xml_tools_empty_string", [{"role": "user", "content": "q"}], {"xml_tools": ""}),
    ("xml_tools_empty_list", [{"role": "user", "content": "q"}], {"xml_tools": []}),
    ("xml_tools_mixed_list", [{"role": "user", "content": "q"}], {"xml_tools": ['{"name": "raw"}', SCHEMA, 3, None]}),
    ("tools_over_xml_tools", [{"role": "user", "content": "q"}], {"tools": [SCHEMA, TOOL], "xml_tools": "unused"}),
    ("empty_tools_then_xml_tools", [{"role": "user", "content": "q"}], {"tools": [], "xml_tools": [TOOL]}),
    ("python_tools_string", [{"role": "user", "content": "q"}], {"python_tools": "def f(x): ..."}),
    ("python_tools_list", [{"role": "user", "content": "q"}], {"python_tools": ["def f(): ...", SCHEMA, TOOL]}),
    ("python_tools_empty", [{"role": "user", "content": "q"}], {"python_tools": [], "xml_tools": [TOOL]}),
    (
        "generation_prompt_kwarg_no_think",
        [{"role": "user", "content": "q"}],
        {"add_generation_prompt": True, "enable_thinking": False},
    ),
    ("generation_prompt_kwarg_think", [{"role": "user", "content": "q"}], {"add_generation_prompt": True}),
    (
        "assistant_tool_calls_without_content",
        [
            {"role": "user", "content": "Time in Oslo?"},
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_time"}}]},
            {"role": "tool", "content": "09:15", "tool_call_id": "c1", "name": "get_time"},
            {"role": "assistant", "content": "It is 09:15.", "reasoning_content": "Read it off.", "thinking": None},
        ],
        {"enable_thinking": False, "tools": [TOOL], "documents": None},
    ),
    (
        "row_date_string",
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        {"date_string": "29 February 2028"},
    ),
]


@pytest.mark.parametrize("template", ["smollm3", "chatml"])
def test_port_equals_jinja_on_edge_cases(template: str) -> None:
    tok, spec = make(template)
    r = renderer(spec)
    for thinking in (True, False, None):
        r2 = renderer(_spec_thinking(template, thinking)[1])
        for name, m, k in EDGE_CASES + PORT_CASES:
            for agp in (False, True):
                _assert_port_equals_jinja(r2, [m], [k], agp, name)
                if thinking is not None and "enable_thinking" not in (k or {}):
                    continue
                _assert_port_equals_jinja(r2, [m], [{**(k or {}), "enable_thinking": thinking}], agp, name)
    # the date from strftime_now when no date_string is given (neither in the config nor in the row)
    undated = RenderSpec(spec.chat_template, True, None, spec.special_tokens, spec.train_on, spec.eos_token)
    _assert_port_equals_jinja(renderer(undated), [PORT_CASES[0][1]], [None], False, "strftime_now")
    # and token for token, mask for mask, what apply_chat_template gives
    cases = [(n, m, k) for n, m, k in PORT_CASES if m]
    fast = r.fast_rows
    ids, masks = tokenize_conversations(spec, tok, [m for _, m, _ in cases], [k for _, _, k in cases])
    assert r.fast_rows - fast == len(cases)
    for (name, m, k), row_ids, row_mask in zip(cases, ids, masks):
        ref_ids, ref_mask = reference(tok, spec, m, k)
        assert row_ids.tolist() == ref_ids and row_mask.tolist() == ref_mask, name


def _not_a_tool(x: str) -> str:
    """A function, not a JSON schema: transformers turns it into one.

    Args:
        x: anything
    """
    return x


# Rows the ports leave to Jinja: (name, messages, kwargs, templates whose port refuses it).
FALLBACK_CASES: list[tuple[str, list[Any], dict[str, Any] | None, tuple[str, ...]]] = [
    ("unknown_message_key", [{"role": "user", "content": "q", "weight": 0.5}], None, ("smollm3", "chatml")),
    (
        "content_parts",
        [{"role": "user", "content": [{"type": "text", "text": "q"}]}, {"role": "assistant", "content": "a"}],
        None,
        ("smollm3", "chatml"),
    ),
    ("content_number", [{"role": "user", "content": 5}], None, ("smollm3", "chatml")),
    ("unknown_role", [{"role": "developer", "content": "d"}, {"role": "user", "content": "q"}], None, ("smollm3",)),
    ("role_missing", [{"content": "d"}, {"role": "user", "content": "q"}], None, ("smollm3", "chatml")),
    ("unknown_kwarg", [{"role": "user", "content": "q"}], {"persona": "x"}, ("smollm3", "chatml")),
    ("thinking_as_string", [{"role": "user", "content": "q"}], {"enable_thinking": "false"}, ("smollm3", "chatml")),
    ("thinking_as_int", [{"role": "user", "content": "q"}], {"enable_thinking": 0}, ("smollm3", "chatml")),
    ("xml_tools_mapping", [{"role": "user", "content": "q"}], {"xml_tools": {"a": 1}}, ("smollm3", "chatml")),
    ("callable_tool", [{"role": "user", "content": "q"}], {"tools": [_not_a_tool]}, ("smollm3", "chatml")),
    ("tuple_in_tools", [{"role": "user", "content": "q"}], {"xml_tools": [("a", 1)]}, ("smollm3", "chatml")),
    ("documents", [{"role": "user", "content": "q"}], {"documents": [{"text": "d"}]}, ("smollm3", "chatml")),
]


@pytest.mark.parametrize("template", ["smollm3", "chatml"])
def test_rows_the_port_does_not_handle_take_jinja(template: str) -> None:
    tok, spec = make(template)
    r = renderer(spec)
    for name, m, k, refused in FALLBACK_CASES:
        got = r.port(m, row_kwargs(spec, k), False)
        assert (got is None) == (template in refused), name
        slow = r.jinja_rows
        try:
            expected: Any = reference(tok, spec, m, k)
        except Exception as e:  # noqa: BLE001
            expected = type(e)
        try:
            ids, masks = tokenize_conversations(spec, tok, [m], [k])
            out: Any = (ids[0].tolist(), masks[0].tolist())
        except Exception as e:  # noqa: BLE001
            out = type(e)
        if isinstance(expected, tuple) or isinstance(out, tuple):
            assert out == expected, name
        if template in refused:
            assert r.jinja_rows == slow + 1, name


def test_an_edited_template_takes_jinja() -> None:
    """One byte away from a shipped template (here: a comment), or the ports switched off: no port, Jinja renders."""
    edited = TEMPLATES["smollm3"].replace("used by the config", "used by  the config", 1)
    assert edited != TEMPLATES["smollm3"]
    assert fast_render.port_for(edited) is None and fast_render.port_for(TEMPLATES["chatml"] + "\n") is None
    tok, spec = make(edited)
    r = renderer(spec)
    assert r.port is None
    messages, kwargs = load_rows("tools")
    slow = r.jinja_rows
    ids, masks = tokenize_conversations(spec, tok, messages[:20], kwargs[:20])
    assert r.jinja_rows - slow == 20 and r.fast_rows == 0
    for i in range(20):
        ref_ids, ref_mask = reference(tok, spec, messages[i], kwargs[i])
        assert ids[i].tolist() == ref_ids and masks[i].tolist() == ref_mask
    # special tokens never shadow what the ports read; a variable that would, turns the port off
    assert fast_render.port_for(TEMPLATES["chatml"], {"eos_token": EOS}) is not None
    assert fast_render.port_for(TEMPLATES["chatml"], {"strftime_now": "x"}) is None


def test_fast_path_switches_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """SFT_EXP_FAST_RENDER=0: no port, whole texts encoded; the same ids and masks."""
    tok, spec = make("smollm3")
    messages, kwargs = load_rows("tools")
    fast = encode_conversations(spec, tok, messages[:64], kwargs[:64])
    monkeypatch.setattr(fast_render, "ENABLED", False)
    assert fast_render.port_for(TEMPLATES["smollm3"]) is None
    r = Renderer(spec)
    assert r.port is None
    monkeypatch.setattr("sft_exp.data.template._RENDERERS", {spec.key: r})
    slow = encode_conversations(spec, tok, messages[:64], kwargs[:64])
    assert fast.piecewise and not slow.piecewise and r.jinja_rows >= 64 and r.fast_rows == 0
    assert slow.texts == fast.texts and slow.spans == fast.spans
    assert np.array_equal(slow.ids, fast.ids) and np.array_equal(slow.masks, fast.masks)


def test_jinja_rows_are_grouped_by_kwargs_of_the_same_value_and_type() -> None:
    """One render_jinja_template call per distinct kwargs: rows whose kwargs differ only in a type (a tuple for a
    list, 1 for True) or in dict order are rendered apart, each as apply_chat_template renders it."""
    edited = TEMPLATES["smollm3"].replace("used by the config", "used by  the config", 1)
    tok, spec = make(edited)
    row = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    kwargs: list[Any] = [
        {"xml_tools": [["a", 1]]},
        {"xml_tools": [("a", 1)]},
        {"xml_tools": [{"x": 1, "y": 2}]},
        {"xml_tools": [{"y": 2, "x": 1}]},
        {"enable_thinking": False},
        {"enable_thinking": 0},
        None,
        {"xml_tools": [["a", 1]]},
    ]
    ids, masks = tokenize_conversations(spec, tok, [row] * len(kwargs), kwargs)
    for k, row_ids, row_mask in zip(kwargs, ids, masks):
        assert (row_ids.tolist(), row_mask.tolist()) == reference(tok, spec, row, k), k


def test_word_split_encodes_as_the_rust_tokenizer() -> None:
    """Pieces of printable ASCII are cut into the ByteLevel pre-tokenizer's words and each word is encoded once: the
    tokens and offsets equal the Rust tokenizer's on the whole text, on tricky and random ASCII text."""
    import random

    tok, _ = make("smollm3")
    pt = PieceTokenizer(tok)
    assert pt.words_re is not None
    rng = random.Random(0)
    alphabet = "aZ9 '\t\n\r!.{}\"s"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(400)]
    texts += ["It's   ok\n\n  'll 're 9x <|im_end|>\n  <think>x's", "caf\u00e9 \u00e9t\u00e9 \x1c\x0b x", " ", ""]
    texts += texts[:50]  # seen twice: then encoded whole
    for _ in range(2):  # the second round answers from the caches
        ids, offs, rows = pt.encode(texts)
        for i, t in enumerate(texts):
            e = tok.backend_tokenizer.encode(t, add_special_tokens=False)
            a, b = int(rows[i]), int(rows[i + 1])
            assert ids[a:b].tolist() == e.ids, t
            assert [tuple(o) for o in offs[a:b].tolist()] == [tuple(o) for o in e.offsets], t


# ───── train_on: which tokens of an assistant turn are trained ─────


@pytest.mark.parametrize("template", ["smollm3", "chatml"])
@pytest.mark.parametrize("train_on", ["content", "content_and_header"])
def test_trained_runs_are_the_assistant_turns(template: str, train_on: str) -> None:
    tok, spec = make(template, train_on)
    cases = [(load_rows(n)[0][i], load_rows(n)[1][i]) for n in SOURCES for i in range(10)]
    cases += [(m, k) for _, m, k in EDGE_CASES if "consecutive" not in _ and "special_token" not in _]
    enc = encode_conversations(spec, tok, [m for m, _ in cases], [k for _, k in cases])
    for i, (m, k) in enumerate(cases):
        ids, _, mask = enc.row(i)
        assert runs(tok, ids, mask) == assistant_turns(m, k, template, train_on), m


def _whole_turn_markers(template: str) -> str:
    """The smollm3 template with its markers moved around the whole assistant turn (header, empty think block and
    the newline after <|im_end|> included), the way the released SmolLM3 template places them."""
    old = (
        '    {{- "<|im_start|>assistant\\n" -}}\n'
        '    {%- if reasoning_mode == "/no_think" -%}\n'
        '      {{- "<think>\\n\\n</think>\\n" -}}\n'
        "    {%- endif -%}\n"
        "    {%- generation -%}\n"
        '      {{- content.lstrip("\\n") + "<|im_end|>" -}}\n'
        "    {%- endgeneration -%}\n"
        '    {{- "\\n" -}}\n'
    )
    new = (
        "    {%- generation -%}\n"
        '    {{- "<|im_start|>assistant\\n" -}}\n'
        '    {%- if reasoning_mode == "/no_think" -%}\n'
        '      {{- "<think>\\n\\n</think>\\n" -}}\n'
        "    {%- endif -%}\n"
        '      {{- content.lstrip("\\n") + "<|im_end|>" -}}\n'
        '    {{- "\\n" -}}\n'
        "    {%- endgeneration -%}\n"
    )
    assert old in template
    return template.replace(old, new)


@pytest.mark.parametrize("train_on", ["content", "content_and_header"])
def test_train_on_does_not_depend_on_where_the_markers_sit(train_on: str) -> None:
    wide = _whole_turn_markers(TEMPLATES["smollm3"])
    tok, spec = make("smollm3", train_on)
    tok_w, spec_w = make(wide, train_on)
    cases = [(load_rows(n)[0][i], load_rows(n)[1][i]) for n in SOURCES for i in range(10)]
    cases += [(m, k) for _, m, k in EDGE_CASES[:6]]
    a = encode_conversations(spec, tok, [m for m, _ in cases], [k for _, k in cases])
    b = encode_conversations(spec_w, tok_w, [m for m, _ in cases], [k for _, k in cases])
    assert a.texts == b.texts and np.array_equal(a.ids, b.ids)
    assert np.array_equal(a.masks, b.masks)
    # the raw marker mask of the wide template does train the header and the newline: train_on is what removes it
    raw = encode_conversations(spec_w, tok_w, [m for m, _ in cases], [k for _, k in cases], raw=True)
    assert raw.masks.sum() > b.masks.sum()


def test_content_and_header_needs_a_generation_prompt() -> None:
    no_prompt = TEMPLATES["chatml"].replace("{%- if add_generation_prompt", "{%- if false and add_generation_prompt")
    tok, spec = make(no_prompt, "content_and_header")
    with pytest.raises(TemplateError, match="writes no generation prompt"):
        encode_conversations(
            spec, tok, [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]], None
        )


def test_train_on_is_part_of_the_cache_key() -> None:
    from sft_exp.config import to_run_config
    from sft_exp.data.pipeline import cache_key
    from tests.conftest import compose

    run = to_run_config(compose())
    _, a = make("smollm3", "content")
    _, b = make("smollm3", "content_and_header")
    assert cache_key("arith", run, a, "t") != cache_key("arith", run, b, "t")
    assert cache_key("arith", run, a, "t") == cache_key("arith", run, make("smollm3", "content")[1], "t")


# ───── sandbox ─────


ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.append({'role': 'user'}) }}",
    "{{ messages[0].update({'role': 'x'}) }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ '{0.__class__}'.format(1) }}",
    "{{ (messages | first).items() | list }}",
    "{% set ns = namespace(_x=1) %}",
]


@pytest.mark.parametrize("escape", ESCAPES)
def test_sandbox_escapes_fail_as_under_transformers(escape: str) -> None:
    """Every escape attempt fails (or renders nothing) exactly as it does through transformers' own environment."""
    template = escape + TEMPLATES["chatml"]
    tok, spec = make(template)
    row = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    try:
        expected: Any = tok.apply_chat_template(row, tokenize=False)
    except Exception as e:  # noqa: BLE001
        expected = type(e)
    try:
        got: Any = encode_conversations(spec, tok, [row], None).texts[0]
    except Exception as e:  # noqa: BLE001
        got = type(e)
    assert got == expected
    if "__mro__" in escape or "append" in escape or "update" in escape:
        assert got is jinja2.exceptions.SecurityError


# ───── the template check ─────

CHECK_ROWS: list[tuple[list[dict[str, Any]], dict[str, Any] | None]] = [(m, k) for _, m, k in EDGE_CASES[:6]]


def _check(template: str, train_on: str = "content", eos: str = EOS) -> tuple[list[str], list[str]]:
    tok, spec = make(template, train_on, eos)
    _, problems, warnings = check_rows(
        "hand", spec, tok, [m for m, _ in CHECK_ROWS], [k for _, k in CHECK_ROWS], list(range(len(CHECK_ROWS)))
    )
    return problems, warnings


@pytest.mark.parametrize("template", ["smollm3", "chatml"])
@pytest.mark.parametrize("train_on", ["content", "content_and_header"])
def test_check_passes_multi_turn_system_flags_and_tools(template: str, train_on: str) -> None:
    assert _check(template, train_on) == ([], [])


def test_check_passes_on_the_demo_mixture() -> None:
    from sft_exp.config import to_run_config
    from sft_exp.train.model import build_tokenizer
    from tests.conftest import compose

    for overrides in ([], ["template=chatml", "template.train_on=content_and_header"]):
        run = to_run_config(compose(overrides))
        tok = build_tokenizer(run)
        report = check_template(run, RenderSpec.build(run.template, tok), tok)
        assert report.ok and set(report.sources) == set(SOURCES)
        assert all(s["rows_checked"] == 32 and s["trained_tokens"] > 0 for s in report.sources.values())


CHATML = TEMPLATES["chatml"]
_ASSISTANT = '{{- content + "<|im_end|>" -}}\n    {%- endgeneration -%}'
_OTHERS = '{{- content + "<|im_end|>\\n" -}}'
_HEADER = '{{- "<|im_start|>" + message.role + "\\n" -}}'


def _mark(text: str) -> str:
    return "{%- generation -%}" + text + "{%- endgeneration -%}"


def _mark_role(role: str) -> str:
    """Non-assistant turns of `role` get their content inside generation markers."""
    return (
        f'{{%- if message.role == "{role}" -%}}' + _mark("{{- content -}}") + "{%- else -%}{{- content -}}{%- endif -%}"
        '{{- "<|im_end|>\\n" -}}'
    )


BROKEN = {
    "no_markers": (
        CHATML.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", ""),
        "yield no assistant tokens",
    ),
    "end_of_turn_outside": (
        CHATML.replace(_ASSISTANT, '{{- content -}}\n    {%- endgeneration -%}{{- "<|im_end|>" -}}'),
        "end-of-turn token '<|im_end|>' after an assistant turn is not trained",
    ),
    "user_turns_marked": (CHATML.replace(_OTHERS, _mark(_OTHERS)), "the mask covers user text"),
    "tool_turns_marked": (CHATML.replace(_OTHERS, _mark_role("tool")), "the mask covers tool result"),
    "system_marked": (CHATML.replace(_OTHERS, _mark_role("system")), "the mask covers system text"),
    "role_header_marked": (CHATML.replace(_HEADER, _mark(_HEADER)), "the mask covers text outside the assistant turns"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_check_refuses_a_broken_template(case: str) -> None:
    template, needle = BROKEN[case]
    assert template != CHATML, case  # the edit applied
    problems, _ = _check(template)
    assert any(needle in p for p in problems), problems
    assert all(p.startswith("hand") for p in problems)  # the source is named


def test_check_refuses_an_end_of_turn_the_template_does_not_write() -> None:
    problems, _ = _check("chatml", eos="<|pad|>")
    assert any("not closed by the end-of-turn token '<|pad|>'" in p and "template.eos_token" in p for p in problems)


def test_check_report_raises_a_template_error() -> None:
    from sft_exp.config import to_run_config
    from tests.conftest import compose

    run = to_run_config(compose())
    run.mixture.sources = {"units": run.mixture.sources["units"]}
    tok, spec = make(BROKEN["user_turns_marked"][0])
    with pytest.raises(TemplateError, match=r"(?s)^template check failed .*units row \d+: the mask covers user text"):
        check_template(run, spec, tok)


def test_probe_rows_keep_roles_order_and_flags() -> None:
    msgs = [{"role": "system", "content": "Be nice /no_think"}, {"role": "user", "content": "x"}]
    probe, markers = probe_row(msgs, "t")
    assert probe[0]["content"] == "[[t system 0]] /no_think" and probe[1]["content"] == "[[t user 1]]"
    assert markers == [("system", "[[t system 0]]"), ("user", "[[t user 1]]")]


@pytest.mark.slow
def test_prepare_stops_on_a_broken_template(tmp_path: Path, fast_args: list[str]) -> None:
    from tests.conftest import launch

    bad = tmp_path / "bad.jinja"
    bad.write_text(BROKEN["user_turns_marked"][0])
    r = launch(["mode=prepare", *fast_args, f"template.chat_template={bad}"], cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "template check failed" in r.stderr and "the mask covers user text" in r.stderr
    assert "tokenise" not in r.stderr  # stopped before any source was tokenised


# ───── truncation ─────


def test_truncation_report_counts_cut_assistant_turns() -> None:
    # three rows of 10 tokens: assistant tokens at 2-3 (kept), at 5-9 (cut at 6), at 7-9 (all cut at 6)
    masks = np.zeros(30, dtype=np.int8)
    masks[2:4] = 1
    masks[15:20] = 1
    masks[27:30] = 1
    src = SimpleNamespace(assistant_masks=masks, offsets=np.array([0, 10, 20, 30]), lengths=np.array([10, 10, 10]))
    rep = truncation_report(6, "truncate", src, np.array([0, 1, 2, 2]))
    assert rep == {
        "rows_assistant_cut": 2,
        "rows_assistant_cut_examples": [1, 2],
        "assistant_tokens_cut": 4 + 3,
        "rows_untrained_after_cut": 1,
    }
    assert truncation_report(6, "split", src, np.array([0, 1, 2])) == {
        "rows_assistant_cut": 2,
        "rows_assistant_cut_examples": [1, 2],
    }
    assert truncation_report(10, "truncate", src, np.array([0, 1, 2]))["rows_assistant_cut"] == 0


@pytest.mark.slow
def test_prepare_reports_rows_whose_assistant_turn_is_cut(tmp_path: Path, fast_args: list[str]) -> None:
    from tests.conftest import launch

    # tool rows (tool list in the system turn) and long arith/count rows are cut at this length, other rows not
    r = launch(["mode=prepare", *fast_args, "packing.max_length=250"], cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    stats = json.loads((tmp_path / "run/mixture_stats.json").read_text())
    cut = {n: s["rows_assistant_cut"] for n, s in stats["sources"].items()}
    assert sum(cut.values()) > 0 and stats["template_check"]["ok"]
    for name, n in cut.items():
        s = stats["sources"][name]
        assert n <= s["rows_over_max_length"]
        if n:
            assert s["assistant_tokens_cut"] > 0
            assert re.search(rf"warning: {name}: packing.max_length=250 cuts an assistant turn in {n} rows", r.stdout)


def test_truncation_report_reads_only_the_long_rows_of_the_cache(tmp_path: Path) -> None:
    """On a real cached source (memory-mapped chunks) the report gathers just the rows over max_length, and finds
    what a scan of the whole flattened source finds."""
    from sft_exp.config import to_run_config
    from sft_exp.data.pipeline import tokenize_source
    from sft_exp.train.model import build_tokenizer
    from tests.conftest import compose

    run = to_run_config(compose())
    tok = build_tokenizer(run)
    src = tokenize_source("tools", run, RenderSpec.build(run.template, tok), tok, tmp_path)
    rows = np.arange(len(src.lengths))
    flat = SimpleNamespace(assistant_masks=src.assistant_masks, offsets=src.offsets, lengths=src.lengths)
    for max_length in (200, 250, 300):
        rep = truncation_report(max_length, "truncate", src, rows)
        assert rep == truncation_report(max_length, "truncate", flat, rows)
    assert rep["rows_assistant_cut"] > 0


# ───── the recipe's mask: train_on=template ─────


def test_recipe_mask_equals_apply_chat_template_with_the_recipe_template() -> None:
    """experiment=smollm3_sft: ids and mask equal transformers' apply_chat_template(..., return_assistant_tokens_mask=
    True) with the recipe's template text, on system flags, tool turns and both modes (date pinned alike)."""
    from sft_exp.config import to_run_config
    from tests.conftest import compose

    tcfg = to_run_config(compose(["experiment=smollm3_sft"])).template
    assert tcfg.train_on == TrainOn.template and tcfg.date_string == DATE
    text = Path(tcfg.chat_template).read_text()
    assert text.split("\n", 1)[1] == _whole_turn_markers(TEMPLATES["smollm3"]).split("\n", 1)[1]
    assert fast_render._sha256(text) == fast_render.SMOLLM3_RECIPE_SHA256
    tok = tokenizer_with(text)
    spec = RenderSpec.build(tcfg, tok)
    cases = [(m, k) for _, m, k in EDGE_CASES if "consecutive" not in _]
    cases += [(load_rows(n)[0][i], load_rows(n)[1][i]) for n in SOURCES for i in range(3)]
    for thinking in (True, False):
        kws = [{**(k or {}), "enable_thinking": thinking} for _, k in cases]
        enc = encode_conversations(spec, tok, [m for m, _ in cases], kws)
        assert renderer(spec).fast_rows > 0  # the port of the recipe's template, not only Jinja
        for i, (m, k) in enumerate(zip([m for m, _ in cases], kws)):
            ids, _, mask = enc.row(i)
            assert (ids.tolist(), mask.tolist()) == reference(tok, spec, m, k), m
            assert not m or "<|im_start|>assistant\n" in runs(tok, ids, mask)[0] or not mask.any()
    assert _check(text, "template") == ([], [])


def test_prompt_assistant_turns_are_not_trained() -> None:
    """prompt_completion rows: the prompt's assistant turns are rendered but never trained (TRL's completion loss)."""
    tok, spec = make("smollm3", "content")
    flagged = [
        {"role": "user", "content": "a", "train": False},
        {"role": "assistant", "content": "b", "train": False},
        {"role": "user", "content": "c", "train": False},
        {"role": "assistant", "content": "d", "train": True},
    ]
    enc = encode_conversations(spec, tok, [flagged], None)
    ids, _, mask = enc.row(0)
    assert runs(tok, ids, mask) == ["d" + EOS]
    assert encode_conversations(spec, tok, [flagged], None, raw=True).masks.sum() > mask.sum()
    _, problems, warnings = check_rows("pc", spec, tok, [flagged], [None], [0])
    assert (problems, warnings) == ([], [])
