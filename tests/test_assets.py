"""Checks on the embedded assets: demo mixture, tiny tokenizer + config, and the smollm3 / chatml chat templates."""

from __future__ import annotations

import ast
import json
import operator
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from datasets import load_dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "sft_exp" / "assets"
DEMO = ASSETS / "demo"
TINY = ASSETS / "tiny_smollm3"
SMOLLM3 = (ASSETS / "templates" / "smollm3.jinja").read_text(encoding="utf-8")
CHATML = (ASSETS / "templates" / "chatml.jinja").read_text(encoding="utf-8")

SOURCES = ["arith", "reverse", "sort", "units", "tools", "count"]
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<|pad|>"]
DATE = "05 March 2026"

THINK_PERSONA = (
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face. Your role as an assistant involves "
    "thoroughly exploring questions through a systematic thinking process before providing the final precise and "
    "accurate solutions. This requires engaging in a comprehensive cycle of analysis, summarizing, exploration, "
    "reassessment, reflection, backtracking, and iteration to develop well-considered thinking process. Please "
    "structure your response into two main sections: Thought and Solution using the specified format: <think> "
    "Thought section </think> Solution section. In the Thought section, detail your reasoning process in steps. Each "
    "step should include detailed considerations such as analysing questions, summarizing relevant findings, "
    "brainstorming new ideas, verifying the accuracy of the current steps, refining any errors, and revisiting "
    "previous steps. In the Solution section, based on various attempts, explorations, and reflections from the "
    "Thought section, systematically present the final solution that you deem correct. The Solution section should be "
    "logical, accurate, and concise and detail necessary steps needed to reach the conclusion."
)
NO_THINK_PERSONA = "You are a helpful AI assistant named SmolLM, trained by Hugging Face."
NO_TOOLS = "## Tools\n\n### XML Tools\n\nNone\n\n### Python Tools\n\nNone\n\n"


def header(mode: str, instructions: str, tools: str = NO_TOOLS, date: str = DATE) -> str:
    return (
        "<|im_start|>system\n## Metadata\n\nKnowledge Cutoff Date: June 2025\n"
        f"Today Date: {date}\nReasoning Mode: {mode}\n\n## Custom Instructions\n\n{instructions}\n\n{tools}<|im_end|>\n"
    )


def load(name: str) -> list[dict[str, Any]]:
    with (DEMO / f"{name}.jsonl").open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def assistant_contents(row: dict[str, Any]) -> list[str]:
    return [m["content"] for m in row["messages"] if m["role"] == "assistant"]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(TINY)


def render(tok: PreTrainedTokenizerBase, messages: list[dict[str, str]], **kwargs: Any) -> str:
    text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
    assert isinstance(text, str)
    return text


# ───── demo data ─────


@pytest.mark.parametrize("name", SOURCES)
def test_demo_rows_have_smoltalk2_format(name: str) -> None:
    rows = load(name)
    assert 1500 <= len(rows) <= 2500
    for row in rows:
        assert set(row) == {"messages", "chat_template_kwargs"}
        assert isinstance(row["chat_template_kwargs"]["enable_thinking"], bool)
        messages = row["messages"]
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) and m["content"] for m in messages)
        assert {m["role"] for m in messages} <= {"system", "user", "assistant", "tool"}
        assert all(m["role"] != "system" for m in messages[1:])
        assert messages[-1]["role"] == "assistant"


def test_demo_total_size() -> None:
    total = sum((DEMO / f"{name}.jsonl").stat().st_size for name in SOURCES)
    assert 1_000_000 < total < 5_000_000
    assert sorted(p.stem for p in DEMO.glob("*.jsonl")) == sorted(SOURCES)


THINK_RE = re.compile(r"<think>\n(.+)\n</think>\n(\S.*)", re.DOTALL)


@pytest.mark.parametrize("name", ["arith", "count"])
def test_think_sources(name: str) -> None:
    for row in load(name):
        assert row["chat_template_kwargs"] == {"enable_thinking": True}
        (content,) = assistant_contents(row)
        assert THINK_RE.fullmatch(content), content


OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def evaluate(node: ast.expr) -> int:
    """Integer arithmetic with + - * and parentheses, the only syntax the arith source writes."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    assert isinstance(node, ast.BinOp), ast.dump(node)
    return OPERATORS[type(node.op)](evaluate(node.left), evaluate(node.right))


def test_arith_answers_are_right() -> None:
    for row in load("arith"):
        question = next(m["content"] for m in row["messages"] if m["role"] == "user")
        expr = re.search(r"[\d(][\d +\-*()]*[\d)]", question)
        assert expr is not None
        expected = evaluate(ast.parse(expr.group(0), mode="eval").body)
        assert assistant_contents(row)[0].rstrip(".").endswith(f" {expected}")


def test_count_answers_are_right() -> None:
    for row in load("count"):
        answer = assistant_contents(row)[0].split("</think>\n")[1]
        found = re.fullmatch(r"The letter '(.)' appears (\d+) times? in '(\w+)'\.", answer)
        assert found, answer
        assert found.group(3).count(found.group(1)) == int(found.group(2))


def test_reverse_rows() -> None:
    rows = load("reverse")
    for row in rows:
        assert row["chat_template_kwargs"] == {"enable_thinking": False}
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert "<think>" not in row["messages"][1]["content"]
        found = re.fullmatch(r"Reverse the word '(\w+)'\.", row["messages"][0]["content"])
        if found:
            assert found.group(1)[::-1] in row["messages"][1]["content"]


def test_sort_rows_are_multi_turn() -> None:
    rows = load("sort")
    turns = [sum(m["role"] == "user" for m in row["messages"]) for row in rows]
    assert min(turns) >= 2 and max(turns) == 3 and 0.3 < turns.count(3) / len(rows) < 0.8
    for row in rows:
        assert row["chat_template_kwargs"] == {"enable_thinking": False}
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        first, second = assistant_contents(row)[:2]
        items = first.split(", ")
        assert second.split(", ") == items[::-1]
        if items[0].isdigit():
            assert [int(x) for x in items] == sorted(int(x) for x in items)
        else:
            assert items == sorted(items)


def test_units_rows_have_system_personas_and_flags() -> None:
    rows = load("units")
    systems = [row["messages"][0]["content"] for row in rows]
    assert all(row["messages"][0]["role"] == "system" for row in rows)
    think = [s for s in systems if "/think" in s]
    assert 0.15 < len(think) / len(rows) < 0.25
    assert any("/no_think" in s for s in systems) and any("/system_override" in s for s in systems)
    for row, system in zip(rows, systems, strict=True):
        assert row["chat_template_kwargs"] == {"enable_thinking": False}
        (content,) = assistant_contents(row)
        assert content.startswith("<think>\n") == ("/think" in system)
        assert "Formula: " in content


def test_tools_rows() -> None:
    for row in load("tools"):
        kwargs = row["chat_template_kwargs"]
        assert kwargs["enable_thinking"] is False
        tools = kwargs["xml_tools"]
        assert tools and all(set(t) == {"name", "description", "parameters"} for t in tools)
        assert [m["role"] for m in row["messages"]] == ["user", "assistant", "tool", "assistant"]
        call = re.fullmatch(r"<tool_call>\n(.*)\n</tool_call>", row["messages"][1]["content"])
        assert call, row["messages"][1]["content"]
        payload = json.loads(call.group(1))
        assert set(payload) == {"name", "arguments"} and payload["name"] in {t["name"] for t in tools}
        assert isinstance(json.loads(row["messages"][2]["content"]), dict)


def test_demo_generator_is_deterministic(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_demo_data.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for name in SOURCES:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (DEMO / f"{name}.jsonl").read_bytes(), name


# ───── tokenizer and config ─────


def test_tokenizer_loads_with_single_id_special_tokens(tok: PreTrainedTokenizerBase) -> None:
    assert 4000 <= len(tok) <= 4096
    ids = [tok.encode(token, add_special_tokens=False) for token in SPECIAL_TOKENS]
    assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(SPECIAL_TOKENS)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>" and tok.bos_token is None
    assert tok.chat_template == SMOLLM3
    text = "<|im_start|>assistant\n<think>\nok\n</think>\n<tool_call>\n{}\n</tool_call><|im_end|>"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    kept = tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=True)
    assert kept == "assistant\n<think>\nok\n</think>\n<tool_call>\n{}\n</tool_call>"


def test_config_matches_tokenizer(tok: PreTrainedTokenizerBase) -> None:
    config = AutoConfig.from_pretrained(TINY)
    assert config.model_type == "smollm3" and config.vocab_size == len(tok)
    assert config.eos_token_id == tok.eos_token_id and config.pad_token_id == tok.pad_token_id
    assert config.bos_token_id is None and config.tie_word_embeddings
    assert not (TINY / "model.safetensors").exists()
    model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) < 3_000_000


# ───── smollm3 template: exact text ─────


def test_smollm3_think_mode_default_persona(tok: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "<think>\n2 + 3 = 5.\n</think>\nIt is 5."},
        {"role": "user", "content": "And 2 * 3?"},
    ]
    expected = (
        header("/think", THINK_PERSONA)
        + "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        + "<|im_start|>assistant\n<think>\n2 + 3 = 5.\n</think>\nIt is 5.<|im_end|>\n"
        + "<|im_start|>user\nAnd 2 * 3?<|im_end|>\n"
        + "<|im_start|>assistant\n"
    )
    assert render(tok, messages, add_generation_prompt=True, date_string=DATE) == expected
    assert render(tok, messages, add_generation_prompt=True, date_string=DATE, enable_thinking=True) == expected


def test_smollm3_no_think_mode(tok: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye."},
    ]
    expected = (
        header("/no_think", NO_THINK_PERSONA)
        + "<|im_start|>user\nHi!<|im_end|>\n"
        + "<|im_start|>assistant\n<think>\n\n</think>\nHello.<|im_end|>\n"
        + "<|im_start|>user\nBye.<|im_end|>\n"
        + "<|im_start|>assistant\n<think>\n\n</think>\n"
    )
    assert render(tok, messages, add_generation_prompt=True, date_string=DATE, enable_thinking=False) == expected
    without_prompt = expected.removesuffix("<|im_start|>assistant\n<think>\n\n</think>\n")
    assert render(tok, messages, date_string=DATE, enable_thinking=False) == without_prompt


def test_smollm3_system_flags_override_kwargs(tok: PreTrainedTokenizerBase) -> None:
    think = [
        {"role": "system", "content": "Be brief. /think"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nGreet.\n</think>\nHello"},
    ]
    expected = (
        header("/think", "Be brief.")
        + "<|im_start|>user\nHi<|im_end|>\n"
        + "<|im_start|>assistant\n<think>\nGreet.\n</think>\nHello<|im_end|>\n"
    )
    assert render(tok, think, date_string=DATE, enable_thinking=False) == expected

    no_think = [
        {"role": "system", "content": "/no_think Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    expected = (
        header("/no_think", "Be brief.")
        + "<|im_start|>user\nHi<|im_end|>\n"
        + "<|im_start|>assistant\n<think>\n\n</think>\nHello<|im_end|>\n"
    )
    # The flag is removed but the space after it stays: only the right end of the system text is stripped.
    assert render(tok, no_think, date_string=DATE, enable_thinking=True) == expected.replace("Be brief.", " Be brief.")

    only_flag = [{"role": "system", "content": "/think"}, {"role": "user", "content": "Hi"}]
    expected = header("/think", THINK_PERSONA) + "<|im_start|>user\nHi<|im_end|>\n"
    assert render(tok, only_flag, date_string=DATE, enable_thinking=False) == expected


def test_smollm3_system_override(tok: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "You are a pirate. /system_override /no_think"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Arr."},
    ]
    expected = (
        "<|im_start|>system\nYou are a pirate.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\nArr.<|im_end|>\n"
    )
    assert render(tok, messages, date_string=DATE) == expected


def test_smollm3_tools(tok: PreTrainedTokenizerBase) -> None:
    tool = {
        "name": "get_time",
        "description": "Get the local time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
    messages = [
        {"role": "user", "content": "Time in Oslo?"},
        {
            "role": "assistant",
            "content": '<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>',
        },
        {"role": "tool", "content": '{"time": "09:15"}'},
        {"role": "assistant", "content": "It is 09:15."},
    ]
    tools = (
        "## Tools\n\n### XML Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n\n<tools>\n"
        '{"name": "get_time", "description": "Get the local time in a city.", "parameters": {"type": "object", '
        '"properties": {"city": {"type": "string"}}, "required": ["city"]}}\n'
        "</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags.\n\n### Python Tools\n\nNone\n\n"
    )
    expected = (
        header("/no_think", NO_THINK_PERSONA, tools)
        + "<|im_start|>user\nTime in Oslo?<|im_end|>\n"
        + '<|im_start|>assistant\n<think>\n\n</think>\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}'
        + "\n</tool_call><|im_end|>\n"
        + '<|im_start|>user\n{"time": "09:15"}<|im_end|>\n'
        + "<|im_start|>assistant\n<think>\n\n</think>\nIt is 09:15.<|im_end|>\n"
    )
    assert render(tok, messages, date_string=DATE, enable_thinking=False, xml_tools=[tool]) == expected
    # The transformers `tools` argument renders the same section; Arrow-style None keys are left out of the JSON.
    assert render(tok, messages, date_string=DATE, enable_thinking=False, tools=[tool]) == expected
    padded = {**tool, "parameters": {**tool["parameters"], "properties": {"city": {"type": "string", "enum": None}}}}
    assert render(tok, messages, date_string=DATE, enable_thinking=False, xml_tools=[padded]) == expected
    # A string is written as is, like the original template; python_tools likewise.
    as_text = render(tok, messages[:1], date_string=DATE, xml_tools="TOOLS", python_tools="def f(): ...")
    assert "### XML Tools\n\nTOOLS\n\n### Python Tools\n\ndef f(): ...\n\n<|im_end|>\n" in as_text


def test_smollm3_none_kwargs_mean_defaults(tok: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    nones = {"enable_thinking": None, "xml_tools": None, "python_tools": None, "custom_instructions": None}
    expected = header("/think", THINK_PERSONA) + "<|im_start|>user\nHi<|im_end|>\n"
    assert render(tok, messages, date_string=DATE, **nones) == expected
    custom = render(tok, messages, date_string=DATE, enable_thinking=False, custom_instructions="Be kind.")
    assert custom == header("/no_think", "Be kind.") + "<|im_start|>user\nHi<|im_end|>\n"


def test_smollm3_date_defaults_to_today(tok: PreTrainedTokenizerBase) -> None:
    text = render(tok, [{"role": "user", "content": "Hi"}], date_string=None)
    assert f"Today Date: {datetime.now().strftime('%d %B %Y')}\n" in text


def test_chatml_exact_text(tok: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "<tool_call>\n{}\n</tool_call>"},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWeather?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n{}\n</tool_call><|im_end|>\n"
        "<|im_start|>tool\nsunny<|im_end|>\n"
        "<|im_start|>assistant\nSunny.<|im_end|>\n"
    )
    assert render(tok, messages, chat_template=CHATML, enable_thinking=False) == expected
    prompt = render(tok, messages[:2], chat_template=CHATML, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n")


# ───── assistant masks ─────


def masked_runs(tok: PreTrainedTokenizerBase, messages: list[dict[str, str]], **kwargs: Any) -> list[str]:
    out = tok.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    runs: list[list[int]] = []
    for i, (token, bit) in enumerate(zip(ids, mask, strict=True)):
        if bit:
            if i == 0 or not mask[i - 1]:
                runs.append([])
            runs[-1].append(token)
    return [tok.decode(run) for run in runs]


MASK_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": '<tool_call>\n{"name": "w", "arguments": {"city": "Oslo"}}\n</tool_call>'},
    {"role": "tool", "content": '{"temperature": 3}'},
    {"role": "assistant", "content": "It is 3 degrees."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "<think>\nPolite.\n</think>\nYou are welcome!"},
]


@pytest.mark.parametrize("template", ["smollm3", "chatml"])
@pytest.mark.parametrize("thinking", [True, False])
def test_assistant_mask_is_content_plus_im_end(tok: PreTrainedTokenizerBase, template: str, thinking: bool) -> None:
    chat_template = SMOLLM3 if template == "smollm3" else CHATML
    runs = masked_runs(tok, MASK_CHAT, chat_template=chat_template, enable_thinking=thinking, date_string=DATE)
    assert runs == [m["content"] + "<|im_end|>" for m in MASK_CHAT if m["role"] == "assistant"]


@pytest.mark.parametrize("name", SOURCES)
def test_assistant_mask_on_demo_rows(tok: PreTrainedTokenizerBase, name: str) -> None:
    for row in load(name)[:25]:
        runs = masked_runs(tok, row["messages"], date_string=DATE, **row["chat_template_kwargs"])
        assert runs == [content + "<|im_end|>" for content in assistant_contents(row)]


def test_arrow_round_trip_renders_the_same(tok: PreTrainedTokenizerBase) -> None:
    raw = load("tools")[:100]
    arrow = load_dataset("json", data_files=str(DEMO / "tools.jsonl"), split="train").select(range(100))
    for item, loaded in zip(raw, arrow, strict=True):
        expected = render(tok, item["messages"], date_string=DATE, **item["chat_template_kwargs"])
        assert render(tok, loaded["messages"], date_string=DATE, **loaded["chat_template_kwargs"]) == expected
