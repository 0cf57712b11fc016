"""Generation-based evaluation (sft_exp/eval): scorers on known texts, mode compliance, aggregation, the sweep
objective, config checks, real batched generation with the tiny model (random, and trained to recite held-out
turns), the evaluate and chat CLIs, and whole runs (files, tracker, a failing scorer, an Optuna sweep on a
generation metric)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from sft_exp.config import ConfigError, to_run_config, validate
from sft_exp.eval.scorers import (
    ScorerError,
    aggregate,
    check_objective,
    compliance,
    final_answer,
    flat_block,
    metric_direction,
    objective_value,
    resolve_scorer,
    split_think,
    sweeper_value,
    think_ok,
)
from tests.conftest import PY, REPO, compose, launch

CONTROL = ["<|im_start|>", "<|im_end|>", "<|pad|>"]


def score(name: str, reference: str, generation: str, **args: object) -> dict:
    return resolve_scorer(name, args, "mixture.sources.x")([], reference, generation, {}, "source x, row 0, turn 0")


# ------------------------------------------------------------------------------------------------------ scorers
def test_answers_are_taken_after_the_think_block_and_normalised() -> None:
    assert split_think("<think>\nstep 1\n</think>\nThe answer is 8.") == ("\nstep 1\n", "\nThe answer is 8.")
    assert split_think("no think here") == (None, "no think here")
    assert split_think("<think>\nnever closed") == (None, "")  # the answer never came
    assert final_answer("<think>x</think>\n  The   Answer is 8. ") == "the answer is 8"
    assert final_answer("Ünïcode\u00a0 ﬁne.") == "ünïcode fine"  # NFKC: the ligature and the no-break space


def test_exact_match_and_contains() -> None:
    ref = "<think>\n3 * 3 = 9\n</think>\nThe answer is 8."
    assert score("exact_match", ref, "<think>other steps</think>\nthe answer is 8") == {
        "exact_match": 1.0,
        "score": 1.0,
    }
    assert score("exact_match", ref, "The answer is 9.")["exact_match"] == 0.0
    assert score("exact_match", ref, "<think>\nThe answer is 8.")["exact_match"] == 0.0  # think never closed
    assert score("contains", "tfos", "So the answer is 'tfos'.") == {"contains": 1.0, "score": 1.0}
    assert score("contains", "tfos", "So the answer is 'soft'.")["contains"] == 0.0
    assert score("none", ref, "anything") == {}


def test_regex_compares_the_last_match_of_both_answers() -> None:
    pattern = r"(-?\d+)\.?$"
    assert score("regex", "<think>9 + 1 = 10</think>\n49 - 29 + 37 = 57.", "The answer is 57", pattern=pattern) == {
        "regex": 1.0,
        "regex_found": 1.0,
        "score": 1.0,
    }
    assert score("regex", "The answer is 57.", "The answer is 56.", pattern=pattern)["regex"] == 0.0
    # a number inside the think block does not count: only the final answer is searched
    assert score("regex", "The answer is 57.", "<think>57</think>\nno idea", pattern=pattern) == {
        "regex": 0.0,
        "regex_found": 0.0,
        "score": 0.0,
    }
    # no group: the whole match; a reference without a match makes the pattern a format check
    assert score("regex", "x", "Answer: B", pattern=r"Answer: [A-D]")["regex"] == 1.0
    assert score("regex", "x", "answer: b", pattern=r"Answer: [A-D]", ignore_case=True)["regex"] == 1.0
    assert score("regex", "x", "answer: b", pattern=r"Answer: [A-D]")["regex"] == 0.0


def test_json_tool_call_matches_name_and_arguments() -> None:
    ref = '<tool_call>\n{"name": "convert_units", "arguments": {"value": 436, "from_unit": "gal", "to_unit": "L"}}'
    ref += "\n</tool_call>"
    same = '<tool_call>\n{"arguments": {"to_unit": "L", "from_unit": "gal", "value": 436.0}, "name": "convert_units"}'
    same += "\n</tool_call>"
    assert score("json_tool_call", ref, same) == {
        "json_tool_call": 1.0,
        "tool_call_parses": 1.0,
        "tool_call_name": 1.0,
        "score": 1.0,
    }
    wrong_arg = same.replace('"L"', '"mL"')
    assert score("json_tool_call", ref, wrong_arg)["json_tool_call"] == 0.0
    assert score("json_tool_call", ref, wrong_arg)["tool_call_name"] == 1.0
    broken = '<tool_call>\n{"name": "convert_units", "arguments": {"value": 436,\n</tool_call>'
    assert score("json_tool_call", ref, broken)["tool_call_parses"] == 0.0
    assert score("json_tool_call", ref, "436 gallons is 1650.44 liters.")["json_tool_call"] == 0.0
    # arguments given as a JSON string are read as the object they encode
    args = json.dumps(json.dumps({"value": 436, "from_unit": "gal", "to_unit": "L"}))
    as_string = f'<tool_call>{{"name": "convert_units", "arguments": {args}}}</tool_call>'
    assert score("json_tool_call", ref, as_string)["json_tool_call"] == 1.0
    # a turn whose reference calls no tool is not scored (None: left out of the means)
    assert score("json_tool_call", "It is 26 degrees.", "It is 26 degrees.") == {
        "json_tool_call": None,
        "tool_call_parses": None,
        "tool_call_name": None,
        "score": None,
    }


def _plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_scorers.py").write_text(
        textwrap.dedent(
            """
            def length_ok(prompt, reference, generation, row, limit=10):
                return {"short": len(generation) <= limit, "chars": len(generation), "turns": len(prompt)}
            length_ok.directions = {"chars": "minimize"}

            def not_a_dict(prompt, reference, generation, row):
                return 1.0

            def boom(prompt, reference, generation, row):
                raise KeyError("expected_key")

            def text_value(prompt, reference, generation, row):
                return {"label": "good"}
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_scorers"


def test_plugin_scorers_get_prompt_reference_generation_row_and_args(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = _plugin(tmp_path, monkeypatch)
    with pytest.raises(ConfigError, match=r"mixture.sources.x.scorer_args: scorer 'my_scorers:not_a_dict' cannot be"):
        resolve_scorer(f"{mod}:not_a_dict", {"pattern": "x"}, "mixture.sources.x")  # it takes no such argument
    s = resolve_scorer(f"{mod}:length_ok", {"limit": 3}, "mixture.sources.x")
    out = s([{"role": "user", "content": "hi"}], "ref", "abcd", {"messages": []}, "here")
    # the plug-in's first key is its main metric (score), bools count as 0/1
    assert out == {"short": 0.0, "chars": 4.0, "turns": 1.0, "score": 0.0}
    assert s.direction("chars") == "minimize" and s.direction("short") == "maximize"
    with pytest.raises(ScorerError, match=f"scorer '{mod}:not_a_dict' returned float on source x, row 3, turn 1"):
        resolve_scorer(f"{mod}:not_a_dict", {}, "k")([], "r", "g", {}, "source x, row 3, turn 1")
    with pytest.raises(ScorerError, match=f"scorer '{mod}:boom' raised on here: KeyError: 'expected_key'"):
        resolve_scorer(f"{mod}:boom", {}, "k")([], "r", "g", {}, "here")
    with pytest.raises(ScorerError, match="returned label='good' on here: scores must be numbers"):
        resolve_scorer(f"{mod}:text_value", {}, "k")([], "r", "g", {}, "here")


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("bleu", {}, "mixture.sources.x.scorer: unknown scorer 'bleu'. Use one of exact_match, contains, regex"),
        ("no_such_module_xyz:fn", {}, "mixture.sources.x.scorer: module 'no_such_module_xyz' of scorer "),
        ("json:no_such_function", {}, "mixture.sources.x.scorer: module 'json' has no 'no_such_function'"),
        ("json:", {}, "is neither a built-in scorer"),
        ("regex", {}, "mixture.sources.x.scorer_args.pattern: scorer 'regex' needs it"),
        ("regex", {"pattern": "(unclosed"}, "scorer_args.pattern: '(unclosed' is not a valid regular expression"),
        ("exact_match", {"pattern": "x"}, "scorer_args.pattern: not an argument of scorer 'exact_match'"),
    ],
)
def test_bad_scorers_are_config_errors(name: str, args: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        resolve_scorer(name, args, "mixture.sources.x")
    assert message in str(e.value)


# ------------------------------------------------------------------------------------------------------ compliance
def test_think_ok_per_mode() -> None:
    assert think_ok("<think>\nSpell it out.\n</think>\nThe letter appears 1 time.", think=True)
    assert not think_ok("The letter appears 1 time.", think=True)  # never thought
    assert not think_ok("<think>\nSpell it out.\n</think>\n", think=True)  # no answer after the block
    assert not think_ok("<think>a</think><think>b</think>answer", think=True)  # two blocks
    assert not think_ok("answer <think>late</think> more", think=True)  # not first
    assert not think_ok("<think>\nnever closed", think=True)
    assert think_ok("The answer is 'tfos'.", think=False)
    assert think_ok("<think>\n\n</think>\nThe answer.", think=False)  # an empty block is no thinking
    assert not think_ok("<think>\nlet me see\n</think>\nThe answer.", think=False)
    assert not think_ok("stray </think> tag", think=False)


def test_compliance_of_one_turn() -> None:
    assert compliance("<think>a</think>\nB", True, 7, True, CONTROL) == {
        "stops": 1.0,
        "think_ok": 1.0,
        "role_leak": 0.0,
        "mean_new_tokens": 7.0,
    }
    leak = compliance("Sure.<|im_start|>user\nmore", False, 128, False, CONTROL)
    assert leak["role_leak"] == 1.0 and leak["stops"] == 0.0


def test_aggregate_splits_by_mode_and_all_is_the_mean_over_sources() -> None:
    records = [
        ("think", {"stops": 1.0, "regex": 1.0}),
        ("think", {"stops": 0.0, "regex": 0.0}),
        ("no_think", {"stops": 1.0, "regex": None}),  # not applicable: left out of regex only
    ]
    agg = aggregate(records)
    assert agg["stops"] == {"all": pytest.approx(2 / 3), "think": 0.5, "no_think": 1.0, "n": 3}
    assert agg["regex"] == {"all": 0.5, "think": 0.5, "no_think": None, "n": 2}
    block = flat_block({"a": agg, "b": aggregate([("no_think", {"stops": 0.0})])})
    assert block["a"] == {
        "stops": 0.666667,
        "stops/think": 0.5,
        "stops/no_think": 1.0,
        "regex": 0.5,
        "regex/think": 0.5,
    }
    assert block["b"] == {"stops": 0.0, "stops/no_think": 0.0}
    # all: each source counts once, whatever its number of turns
    assert block["all"]["stops"] == pytest.approx((0.666667 + 0.0) / 2, abs=1e-6)
    assert block["all"]["stops/no_think"] == 0.5 and block["all"]["regex"] == 0.5


# ------------------------------------------------------------------------------------------------------ objective
def test_objective_direction_and_sweeper_value() -> None:
    scorers = {n: resolve_scorer(*sc) for n, sc in {"arith": ("exact_match", {}, "k"), "t": ("none", {}, "k")}.items()}
    assert check_objective("gen/all/score", scorers) == "maximize"
    assert check_objective("gen/arith/exact_match/think", scorers) == "maximize"
    assert check_objective("gen/t/role_leak", scorers) == "minimize"
    assert metric_direction("mean_new_tokens/no_think") == "minimize"
    for bad, msg in [
        ("gen/nope/score", "'nope' in 'gen/nope/score' is neither 'all' nor a source"),
        ("gen/t/exact_match", "no scorer of source t reports metric 'exact_match'"),
        ("gen/all/stops/maybe", "mode 'maybe' in 'gen/all/stops/maybe' is not think or no_think"),
        ("gen/score", "'gen/score' is not gen/<source or all>/<metric>"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            check_objective(bad, scorers)
    block = {"all": {"score": 0.25, "role_leak": 0.5}}
    assert objective_value(block, "gen/all/score") == 0.25
    run = to_run_config(compose(["eval.generate.enabled=true", "sweep.objective=gen/all/score"]))
    assert sweeper_value(run, {"eval_generate": block}) == -0.25  # maximised: negated for the minimising sweepers
    run.sweep.objective = "gen/all/role_leak"
    assert sweeper_value(run, {"eval_generate": block}) == 0.5
    assert sweeper_value(run, {}) is None


# ------------------------------------------------------------------------------------------------------ config
def test_generation_is_off_by_default_and_the_demo_names_a_scorer_per_source() -> None:
    run = to_run_config(compose([]))
    validate(run)
    assert run.eval.generate.enabled is False
    assert {n: s.scorer for n, s in run.mixture.sources.items()} == {
        "arith": "regex",
        "count": "regex",
        "reverse": "exact_match",
        "sort": "exact_match",
        "tools": "json_tool_call",
        "units": "regex",
    }
    validate(to_run_config(compose(["eval.generate.enabled=true", "sweep.objective=gen/tools/json_tool_call"])))
    steps = ["eval.generate.enabled=true", "eval.generate.when=steps", "eval.generate.every_steps=5"]
    validate(to_run_config(compose(steps)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["mixture.sources.arith.scorer=bleu"], "mixture.sources.arith.scorer: unknown scorer 'bleu'"),
        (["mixture.sources.tools.scorer=nowhere_pkg.mod:fn"], "mixture.sources.tools.scorer: module 'nowhere_pkg.mod'"),
        (
            ["eval.generate.enabled=true", "eval.generate.rows=33"],
            "eval.generate.rows: 33 rows per source, but mixture.test_split_size holds out 32",
        ),
        (
            ["eval.generate.enabled=true", "mixture.test_split_size=0"],
            "eval.generate.enabled: is true but mixture.test_split_size is 0",
        ),
        (
            ["eval.generate.every_steps=5"],
            "eval.generate.every_steps: is set but eval.generate.when=end does not use it",
        ),
        (["eval.generate.when=steps"], "eval.generate.every_steps: must be >= 1 with eval.generate.when=steps"),
        (["eval.generate.max_new_tokens=0"], "eval.generate.max_new_tokens: must be >= 1"),
        (["sweep.objective=gen/all/score"], "'gen/all/score' is a generation metric but eval.generate.enabled=false"),
        (
            ["eval.generate.enabled=true", "sweep.objective=gen/all/bleu"],
            "no scorer of the mixture reports metric 'bleu'",
        ),
        (["sweep.objective=nope"], "'nope' is neither 'all' nor a source of the mixture, nor gen/<source or all>"),
    ],
)
def test_bad_generation_config_fails_validation(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate(to_run_config(compose(overrides)))
    assert message in str(e.value)


def test_rows_beyond_a_fractional_held_out_set_fail_when_the_prompts_are_built() -> None:
    """With test_split_size a fraction the held-out count is known once the source is read: before training."""
    from sft_exp.eval.generate import GenerationEval
    from sft_exp.train.model import build_tokenizer

    run = to_run_config(
        compose(["eval.generate.enabled=true", "mixture.test_split_size=0.01", "eval.generate.rows=17"])
    )
    validate(run)
    with pytest.raises(ConfigError, match=r"eval.generate.rows: 17 rows asked for, but source 'arith' holds out 16\."):
        GenerationEval.from_run(run, build_tokenizer(run))


# ------------------------------------------------------------------------------------------------------ prompts
def test_every_demo_reference_scores_one_with_its_scorer() -> None:
    """The shipped scorers fit the shipped data: each held-out-able row's every assistant turn, scored against
    itself, gets score 1 (or None where its scorer does not apply) and think_ok 1 in its own mode."""
    from sft_exp.eval.generate import GenerationEval
    from sft_exp.train.model import build_tokenizer

    run = to_run_config(compose(["eval.generate.enabled=true", "mixture.test_split_size=0.5"]))
    tok = build_tokenizer(run)
    gen = GenerationEval.from_run(run, tok, rows=0)  # every held-out row: 800 per source
    counts = {}
    for src in gen.sources:
        turns = src.turns
        scores = [src.scorer(t.messages, t.reference, t.reference, t.record, "self") for t in turns]
        assert all(s.get("score") in (1.0, None) for s in scores), src.name
        assert all(think_ok(t.reference, t.think) for t in turns), src.name
        counts[src.name] = (
            src.rows,
            len(turns),
            sum(t.think for t in turns),
            sum(s.get("score") == 1.0 for s in scores),
        )
    assert counts["arith"] == (800, 800, 800, 800)  # think rows, one turn each
    assert counts["tools"][1] == 1600 and counts["tools"][3] == 800  # a tool call and an answer per row
    assert counts["sort"][1] > 1600 and counts["sort"][2] == 0  # multi-turn, no_think
    assert 0 < counts["units"][2] < 800  # a /think flag in some system prompts


def test_generation_rows_are_the_pipelines_held_out_rows() -> None:
    """The rows generated for are the first of the held-out set the data pipeline selects (select_mixture), for
    either weighting and any weights."""
    import numpy as np

    from sft_exp.data.mixture import select_mixture
    from sft_exp.eval.generate import heldout_rows

    for overrides in (["mixture.test_split_size=32"], ["mixture.test_split_size=0.05", "mixture.seed=3"]):
        run = to_run_config(compose(overrides))
        got = [i for i, _ in heldout_rows(run, "units", None)]
        sel = select_mixture({"units": np.ones(1600)}, {"units": 0.5}, run.mixture.test_split_size, run.mixture.seed,
                             "fraction")  # fmt: skip
        assert got == sel["units"].eval.tolist() and len(got) == (32 if overrides[0].endswith("32") else 80)
        assert [i for i, _ in heldout_rows(run, "units", 5)] == got[:5]


def test_prompts_are_the_conversation_up_to_each_turn_in_the_rows_mode() -> None:
    from sft_exp.eval.generate import GenerationEval
    from sft_exp.train.model import build_tokenizer

    run = to_run_config(compose(["eval.generate.enabled=true", "eval.generate.rows=2"]))
    tok = build_tokenizer(run)
    gen = GenerationEval.from_run(run, tok, sources=["arith", "tools"])
    arith, tools = gen.sources
    ids = gen.prompt_ids(tok)
    texts = [tok.decode(x) for x in ids]
    # think row: the prompt ends with the bare assistant header; the reference starts with its think block
    assert texts[0].endswith("<|im_start|>assistant\n") and "Reasoning Mode: /think" in texts[0]
    assert arith.turns[0].reference.startswith("<think>\n") and arith.turns[0].think
    # no_think tool rows: a tool call turn, then the answer after the tool result (a user turn in this template)
    t0, t1 = tools.turns[0], tools.turns[1]
    assert (t0.row, t0.turn, t1.row, t1.turn) == (t0.row, 0, t0.row, 1)
    assert [m["role"] for m in t1.messages] == ["user", "assistant", "tool"]
    tool_text = texts[len(arith.turns)]
    assert tool_text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n")
    assert '"name": "' in tool_text and "<tools>" in tool_text  # the row's xml_tools kwarg reached the template
    # the prompt is exactly what apply_chat_template renders for the conversation so far
    assert texts[0] == tok.apply_chat_template(
        arith.turns[0].messages, tokenize=False, add_generation_prompt=True, **arith.turns[0].kwargs
    )
    # the same rows in every run of a sweep: a different mixture weight does not move them
    other = to_run_config(
        compose(["eval.generate.enabled=true", "eval.generate.rows=2", "mixture.sources.arith.weight=0.3"])
    )
    assert [t.row for t in GenerationEval.from_run(other, tok, sources=["arith"]).sources[0].turns] == [
        t.row for t in arith.turns
    ]
    run.eval.generate.turns = "last"
    assert [t.turn for t in GenerationEval.from_run(run, tok, sources=["tools"]).sources[0].turns] == [1, 1]


# ------------------------------------------------------------------------------------------------------ generation
def _random_model(run):  # noqa: ANN001, ANN202
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sft_exp.train.model import align_with_tokenizer, build_tokenizer

    tok = build_tokenizer(run)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(run.model.name_or_path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    return tok, align_with_tokenizer(model, tok)


def test_batched_left_padded_generation_equals_one_prompt_at_a_time() -> None:
    """Real greedy generation with the tiny model (random weights): prompts of different lengths in one left-padded
    batch give exactly what each gives alone; a turn that never ends counts max_new_tokens tokens and stops=0."""
    from sft_exp.eval.generate import GenerationEval, generate

    run = to_run_config(
        compose(["eval.generate.enabled=true", "eval.generate.rows=1", "eval.generate.max_new_tokens=12"])
    )
    tok, model = _random_model(run)
    gen = GenerationEval.from_run(run, tok, sources=["arith", "reverse", "tools"])
    ids = gen.prompt_ids(tok)
    assert len({len(x) for x in ids}) == 4  # really different lengths
    model.train()
    batched = generate(model, tok, ids, 12, batch_size=len(ids))
    alone = [generate(model, tok, [x], 12, batch_size=1)[0] for x in ids]
    assert [(g.text, g.new_tokens, g.stopped) for g in batched] == [(g.text, g.new_tokens, g.stopped) for g in alone]
    assert model.training  # generation leaves the model's mode as it found it
    for g in batched:  # a turn that does not stop has all 12 tokens; one that stops counts its end-of-turn token
        assert (g.new_tokens == 12) if not g.stopped else (1 <= g.new_tokens <= 12 and "<|im_end|>" not in g.text)
    res = gen.run(model, tok, step=3, label="step")
    src = res["sources"]["tools"]
    assert src["rows"] == 1 and src["turns"] == {"all": 2, "think": 0, "no_think": 2}
    assert src["metrics"]["json_tool_call"]["n"] == 1  # only the tool-call turn is scored
    # all = the mean over sources of each source's share of turns that stopped
    per_source, k = [], 0
    for s in gen.sources:
        per_source.append(sum(g.stopped for g in batched[k : k + len(s.turns)]) / len(s.turns))
        k += len(s.turns)
    assert res["all"]["stops"] == pytest.approx(sum(per_source) / len(per_source), abs=1e-6)
    assert res["prompts"] == len(ids) and res["new_tokens"] == sum(g.new_tokens for g in batched)
    assert len(res["sources"]["tools"]["samples"]) == 2 and res["step"] == 3 and res["errors"] == []


# A tiny model trained to recite the first held-out turn of three sources: generation must give them back exactly.
@pytest.fixture(scope="module")
def reciting(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    import torch

    from sft_exp.config import dump_run_config
    from sft_exp.eval.generate import GenerationEval

    run = to_run_config(compose(["eval.generate.enabled=true", "eval.generate.rows=1", "model.init=random"]))
    tok, model = _random_model(run)
    gen = GenerationEval.from_run(run, tok, sources=["arith", "reverse", "tools"])
    turns = [t for s in gen.sources for t in s.turns]
    seqs = []
    for p, t in zip(gen.prompt_ids(tok), turns):
        x = torch.tensor(p + tok(t.reference, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        labels = x.clone()
        labels[: len(p)] = -100
        seqs.append((x[None], labels[None]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(100):
        loss = sum(model(input_ids=x, labels=y).loss for x, y in seqs) / len(seqs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    run_dir = tmp_path_factory.mktemp("reciting")
    model.save_pretrained(run_dir)
    tok.save_pretrained(run_dir)
    (run_dir / "run_config.yaml").write_text(dump_run_config(run))
    return run, tok, model, gen, turns, run_dir


@pytest.mark.slow
def test_a_model_that_recites_its_turns_scores_one_and_complies(reciting) -> None:  # noqa: ANN001
    run, tok, model, gen, turns, _ = reciting
    res = gen.run(model, tok, step=100, label="end")
    for t, s in zip(turns, [s for src in res["sources"].values() for s in src["samples"]]):
        assert (s["row"], s["turn"], s["generation"], s["stopped"]) == (t.row, t.turn, t.reference, True)
    block = res["all"]
    assert block["score"] == 1.0 and block["stops"] == 1.0 and block["role_leak"] == 0.0
    assert block["think_ok/think"] == 1.0 and block["think_ok/no_think"] == 1.0
    arith = res["sources"]["arith"]["metrics"]
    assert arith["regex"] == {"all": 1.0, "think": 1.0, "no_think": None, "n": 1}
    n_ref = len(tok(turns[0].reference, add_special_tokens=False)["input_ids"]) + 1  # + the end-of-turn token
    assert arith["mean_new_tokens"]["all"] == n_ref
    # the same prompts one at a time and in one left-padded batch
    gen.batch_size = 1
    assert gen.run(model, tok)["all"] == block
    # cut short: the think turn has not closed its block, nothing stops
    short = type(gen)(gen.sources, max_new_tokens=5)
    cut = short.run(model, tok)["all"]
    assert cut["stops"] == 0.0 and cut["think_ok/think"] == 0.0 and cut["mean_new_tokens"] == 5.0


@pytest.mark.slow
def test_evaluate_and_chat_clis_on_a_saved_run(reciting, tmp_path: Path) -> None:  # noqa: ANN001
    run, tok, model, gen, turns, run_dir = reciting
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "gen.json"
    r = subprocess.run(
        [PY, "-m", "sft_exp.evaluate", str(run_dir), "--rows", "1", "--sources", "arith,reverse,tools", "--out"]
        + [str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["all"]["score"] == 1.0 and res["all"]["stops"] == 1.0 and res["label"] == "evaluate"
    assert "generation eval (evaluate)" in r.stdout and f"wrote {out}" in r.stdout
    # bad input: more rows than held out, and a source that is not in the mixture
    bad = subprocess.run(
        [PY, "-m", "sft_exp.evaluate", str(run_dir), "--rows", "40"], capture_output=True, text=True, cwd=REPO, env=env
    )
    assert (
        bad.returncode == 2
        and "error: eval.generate.rows: 40 rows asked for, but source 'arith' holds out 32" in bad.stderr
    )
    bad = subprocess.run(
        [PY, "-m", "sft_exp.evaluate", str(tmp_path)], capture_output=True, text=True, cwd=REPO, env=env
    )
    assert bad.returncode == 2 and "neither a sft-exp run directory" in bad.stderr

    reverse = turns[1]  # no_think, one user message
    c = subprocess.run(
        [PY, "-m", "sft_exp.chat", str(run_dir), "--no-think", "--prompt", reverse.messages[-1]["content"]],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert c.returncode == 0, c.stderr[-3000:]
    assert c.stdout.rstrip("\n") == reverse.reference


# ------------------------------------------------------------------------------------------------------ whole runs
@pytest.mark.slow
def test_a_run_with_generation_eval_writes_results_everywhere(tmp_path: Path, fast_args: list[str]) -> None:
    args = [*fast_args, "eval.generate.enabled=true", "eval.generate.rows=2", "eval.generate.max_new_tokens=16"]
    args += ["eval.generate.when=steps", "eval.generate.every_steps=3", "tracking=tensorboard"]
    r = launch(args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    block = metrics["eval_generate"]
    assert set(block) == {"arith", "count", "reverse", "sort", "tools", "units", "all"}
    assert (
        block["all"]["mean_new_tokens"] <= 16
        and "think_ok/think" in block["all"]
        and "json_tool_call" in block["tools"]
    )
    assert (
        metrics["eval_generate_before"]["all"].keys() == block["all"].keys() and metrics["eval_generate_error"] is None
    )
    res = json.loads((run_dir / "eval_generate.json").read_text())
    assert res["label"] == "end" and res["step"] == 6
    assert [(h["label"], h["step"]) for h in res["history"]] == [("before", 0), ("step", 3)]
    assert res["sources"]["sort"]["turns"]["all"] >= 4 and res["sources"]["arith"]["samples"][0]["prompt"]
    assert "generation eval (before, step 0)" in r.stdout and "generation eval (end, step 6)" in r.stdout
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert any(h.get("step") == 3 and "gen/all/stops" in h for h in state["log_history"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(run_dir / "tensorboard"))
    ev.Reload()
    assert [e.step for e in ev.Scalars("gen/all/score")] == [0, 3, 6]
    assert "gen/samples/text_summary" in ev.Tags()["tensors"]


@pytest.mark.slow
def test_a_scorer_that_raises_after_training_keeps_the_model_and_metrics(tmp_path: Path, fast_args: list[str]) -> None:
    (tmp_path / "late_scorer.py").write_text(
        "def score(prompt, reference, generation, row):\n    raise RuntimeError('scorer bug')\n"
    )
    args = [*fast_args, "eval.generate.enabled=true", "eval.generate.rows=1", "eval.generate.max_new_tokens=4"]
    args += ["mixture.sources.reverse.scorer=late_scorer:score", "eval_before_train=false"]
    r = launch(args, cwd=tmp_path, env={"PYTHONPATH": f"{tmp_path}:{REPO}"})
    assert r.returncode == 2, r.stderr[-3000:]
    assert "error: mixture.sources.reverse.scorer: scorer 'late_scorer:score' raised on source reverse, row" in r.stderr
    assert "RuntimeError: scorer bug" in r.stderr and "python -m sft_exp.evaluate" in r.stderr
    run_dir = tmp_path / "run"
    assert (run_dir / "model.safetensors").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "late_scorer:score" in metrics["eval_generate_error"] and metrics["global_steps"] == 6
    assert metrics["eval_generate"]["arith"]["stops"] >= 0  # the other sources were scored
    # before training (the default eval_before_train) the same scorer stops the run before the first step
    r = launch(
        [a for a in args if a != "eval_before_train=false"] + [f"hydra.run.dir={tmp_path}/run2"],
        cwd=tmp_path,
        env={"PYTHONPATH": f"{tmp_path}:{REPO}"},
    )
    assert r.returncode == 2 and "scorer 'late_scorer:score' raised" in r.stderr
    assert not (tmp_path / "run2" / "model.safetensors").exists()


@pytest.mark.slow
def test_optuna_searches_a_generation_metric_in_its_direction(tmp_path: Path, fast_args: list[str]) -> None:
    from tests.test_sweep import sweep_args

    sweep = tmp_path / "sweep"
    args = [
        "sweep=optuna_lr",
        "hydra.sweeper.n_trials=2",
        "sweep.objective=gen/all/think_ok",
        "eval_before_train=false",
    ]
    args += ["eval.generate.enabled=true", "eval.generate.rows=2", "eval.generate.max_new_tokens=8"]
    r = launch([*args, *sweep_args(fast_args, sweep)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    data = json.loads((sweep / "sweep_index.json").read_text())
    values = [e["final"]["objective"] for e in data["runs"].values()]
    assert all(v == e["final"]["eval_generate"]["all"]["think_ok"] for v, e in zip(values, data["runs"].values()))
    import yaml

    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(-max(values))  # maximised: the sweeper minimised its negation
    c = subprocess.run(
        [PY, "-m", "sft_exp.tools.compare", str(sweep), "--objective", "gen/all/think_ok"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert c.returncode == 0, c.stderr[-3000:]
    head = c.stdout.splitlines()[1]
    assert "gen_score" in head and "gen_think_ok_think" in head and "gen_tools" in head
    assert (sweep / "final_gen_vs_train.learning_rate.png").exists()
