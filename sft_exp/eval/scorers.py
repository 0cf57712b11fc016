"""Scorers of generated assistant turns, mode compliance, and how results are aggregated.

Pure Python (no torch, no transformers): the config's `validate` imports this module to check scorer names and
plug-ins before anything heavy runs.

A scorer is called once per generated turn as ``fn(prompt_messages, reference, generation, row, **scorer_args)``:

- ``prompt_messages``: the conversation up to the generated turn (list of role/content dicts);
- ``reference``: the held-out assistant text of that turn;
- ``generation``: the model's text for it (special tokens kept, the final end-of-turn token removed);
- ``row``: the source row as loaded (``messages``, ``chat_template_kwargs``, ...);
- ``scorer_args``: ``mixture.sources.<name>.scorer_args`` as keyword arguments (none when that is empty).

It returns a dict of named scores (numbers; a bool counts as 0/1; ``None`` means "not applicable to this turn" and
leaves the turn out of that metric's mean). A scorer that raises, or returns anything but such a dict, is a
``ScorerError`` naming the source, the scorer, the row and the turn.

Built-ins (``mixture.sources.<name>.scorer``):

==================  ==========================================================================================
``exact_match``     the final answer (text after any ``</think>``) equals the reference's, after `normalize`
``contains``        the generation's final answer contains the reference's final answer, both normalised
``regex``           ``scorer_args.pattern``: the last match of the pattern in both final answers (group 1 when
                    the pattern has groups, else the whole match) must be equal; a reference without a match
                    makes the pattern a format check (1 when the generation matches). Also ``regex_found``.
``json_tool_call``  every ``<tool_call>{json}</tool_call>`` of the reference is matched, in order, by a generated
                    call that parses as ``{"name", "arguments"}`` with the same name and arguments (numbers compared
                    as numbers). Also ``tool_call_parses`` and ``tool_call_name``. Turns whose reference holds no
                    tool call are not scored (``None``).
``none``            no score (the mode compliance below is still computed)
==================  ==========================================================================================

Each built-in's main metric carries the scorer's name (``exact_match``, ``contains``, ``regex``,
``json_tool_call``); a plug-in's is its ``score`` key when it returns one, else its first key. Every source also gets
``score`` (a copy of its main metric, so ``gen/all/score`` averages the main metric of every scored source).

Mode compliance, for every turn whatever the scorer (`compliance`):

- ``stops``: the generation ended with the template's end-of-turn token within ``max_new_tokens``;
- ``think_ok``: a /think turn holds exactly one well-formed ``<think>...</think>`` block, first, followed by a
  non-empty answer; a /no_think turn holds no thinking (no think tag, except an empty ``<think></think>`` block);
- ``role_leak``: a chat control token (the tokenizer's special tokens, e.g. ``<|im_start|>``) inside the reply;
- ``mean_new_tokens``: generated tokens, the end-of-turn token included.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sft_exp.errors import ConfigError, SftExpError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_CALL_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_EMPTY_THINK_RE = re.compile(r"<think>\s*</think>")

COMPLIANCE_METRICS = ("stops", "think_ok", "role_leak", "mean_new_tokens")
# Metrics a lower value of which is better; every other metric (scores, stops, think_ok) is maximised.
MINIMIZE = frozenset({"role_leak", "mean_new_tokens"})
MODES = ("think", "no_think")

ScoreFn = Callable[..., Any]


class ScorerError(SftExpError, ValueError):
    """A scorer that cannot be used or failed on a row; the message names the source, the scorer and the row."""


class GenerationError(SftExpError):
    """The generation eval after training failed (a scorer, or the generation); the trained model is kept."""


# ---------------------------------------------------------------------------------------------------- text helpers
def split_think(text: str) -> tuple[str | None, str]:
    """(thinking, final answer) of an assistant text.

    Args:
        text: an assistant turn (reference or generation).

    Returns:
        The text between the first ``<think>`` and the last ``</think>`` (None when there is no ``</think>``), and the
        text after the last ``</think>`` (the whole text when there is none; "" when a ``<think>`` is never closed:
        the answer never came).
    """
    if THINK_CLOSE in text:
        head, _, answer = text.rpartition(THINK_CLOSE)
        thinking = head.split(THINK_OPEN, 1)[1] if THINK_OPEN in head else head
        return thinking, answer
    if THINK_OPEN in text:
        return None, ""
    return None, text


def normalize(text: str) -> str:
    """Unicode NFKC, lower case, runs of whitespace as one space, no surrounding whitespace, no final period."""
    t = unicodedata.normalize("NFKC", text).lower()
    t = " ".join(t.split())
    return t[:-1].rstrip() if t.endswith(".") else t


def final_answer(text: str) -> str:
    """The normalised final answer: the text after any think block (see `split_think`), `normalize`d."""
    return normalize(split_think(text)[1])


# ----------------------------------------------------------------------------------------------------- built-ins
def exact_match(prompt: list[dict[str, Any]], reference: str, generation: str, row: Any) -> dict[str, float]:
    """1.0 when the final answers (after any think block, normalised) are equal, else 0.0."""
    return {"exact_match": float(final_answer(generation) == final_answer(reference))}


def contains(prompt: list[dict[str, Any]], reference: str, generation: str, row: Any) -> dict[str, float]:
    """1.0 when the generation's final answer contains the reference's final answer (both normalised)."""
    want = final_answer(reference)
    return {"contains": float(bool(want) and want in final_answer(generation))}


def _last_match(pattern: re.Pattern[str], text: str) -> str | None:
    found = None
    for m in pattern.finditer(text):
        found = m.group(1) if pattern.groups else m.group(0)
    return found


def regex(
    prompt: list[dict[str, Any]], reference: str, generation: str, row: Any, pattern: str, ignore_case: bool = False
) -> dict[str, float]:
    """The last match of `pattern` in each final answer (after any think block, whitespace-stripped); group 1 when
    the pattern has groups. `regex`: the generation's value equals the reference's (the reference has no match: the
    generation matches at all); `regex_found`: the generation matches."""
    rx = _compile(pattern, ignore_case)
    want = _last_match(rx, split_think(reference)[1].strip())
    got = _last_match(rx, split_think(generation)[1].strip())
    ok = got is not None and (want is None or got.strip() == want.strip())
    return {"regex": float(ok), "regex_found": float(got is not None)}


def _compile(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE if ignore_case else 0)


def _tool_calls(text: str) -> list[Any]:
    """Each <tool_call> block of a text, parsed (a block that does not parse is the string itself)."""
    out: list[Any] = []
    for body in TOOL_CALL_RE.findall(text):
        try:
            out.append(json.loads(body))
        except ValueError:
            out.append(body)
    return out


def _plain(value: Any) -> Any:
    """JSON values compared as values: ints and floats as numbers, lists in order, dicts by key."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _call_parts(call: Any) -> tuple[str, Any] | None:
    """(name, arguments) of a parsed call, None when it is not a {"name": str, "arguments": object} call."""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    args = call.get("arguments", call.get("parameters", {}))
    if isinstance(args, str):  # arguments given as a JSON string, as some formats do
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return call["name"], _plain(args)


def json_tool_call(prompt: list[dict[str, Any]], reference: str, generation: str, row: Any) -> dict[str, float | None]:
    """The reference's tool calls vs the generated ones (see the module docstring); None on turns without a call."""
    want = [_call_parts(c) for c in _tool_calls(reference)]
    want = [w for w in want if w is not None]
    if not want:
        return {"json_tool_call": None, "tool_call_parses": None, "tool_call_name": None}
    got = [_call_parts(c) for c in _tool_calls(split_think(generation)[1])]
    parses = bool(got) and all(g is not None for g in got)
    names = [g[0] if g is not None else None for g in got]
    same_names = names == [w[0] for w in want]
    match = parses and same_names and all(g is not None and g[1] == w[1] for g, w in zip(got, want))
    return {"json_tool_call": float(match), "tool_call_parses": float(parses), "tool_call_name": float(same_names)}


def no_score(prompt: list[dict[str, Any]], reference: str, generation: str, row: Any) -> dict[str, float]:
    """No score: only the mode compliance is reported."""
    return {}


# name -> (function, required args, optional args, main metric)
BUILTINS: dict[str, tuple[ScoreFn, tuple[str, ...], tuple[str, ...], str | None]] = {
    "exact_match": (exact_match, (), (), "exact_match"),
    "contains": (contains, (), (), "contains"),
    "regex": (regex, ("pattern",), ("ignore_case",), "regex"),
    "json_tool_call": (json_tool_call, (), (), "json_tool_call"),
    "none": (no_score, (), (), None),
}
# Every metric a built-in can report (the sweep objective checks names against these).
BUILTIN_METRICS: dict[str, tuple[str, ...]] = {
    "exact_match": ("exact_match",),
    "contains": ("contains",),
    "regex": ("regex", "regex_found"),
    "json_tool_call": ("json_tool_call", "tool_call_parses", "tool_call_name"),
    "none": (),
}


# ------------------------------------------------------------------------------------------------------ resolving
@dataclass(frozen=True)
class Scorer:
    """A resolved scorer: a built-in or a `package.module:function` plug-in, with its args from the config."""

    name: str
    fn: ScoreFn
    args: dict[str, Any] = field(default_factory=dict)
    main: str | None = None  # the metric copied to `score` (None: a plug-in's `score` key, else its first key)
    builtin: bool = True

    def __call__(
        self, prompt: list[dict[str, Any]], reference: str, generation: str, row: Any, where: str
    ) -> dict[str, float | None]:
        """Score one turn.

        Args:
            prompt, reference, generation, row: see the module docstring.
            where: names the source, row and turn in errors (e.g. "source arith, row 17, turn 0").

        Returns:
            {metric: float or None}, plus `score` (the main metric) when the scorer has one.

        Raises:
            ScorerError: the scorer raised, or returned something else than a dict of numbers / None.
        """
        try:
            out = self.fn(prompt, reference, generation, row, **self.args)
        except Exception as e:  # noqa: BLE001 - any failure of user code is reported as this scorer's
            first = str(e).splitlines()[0][:300] if str(e) else ""
            raise ScorerError(
                f"scorer '{self.name}' raised on {where}: {type(e).__name__}: {first}. Fix the scorer or choose "
                "another (mixture.sources.<name>.scorer)"
            ) from e
        if not isinstance(out, dict):
            raise ScorerError(
                f"scorer '{self.name}' returned {type(out).__name__} on {where}, not a dict of named scores. "
                "Return e.g. {'accuracy': 1.0}"
            )
        scores: dict[str, float | None] = {}
        for k, v in out.items():
            if v is None:
                scores[str(k)] = None
                continue
            if isinstance(v, bool):
                v = float(v)
            if not isinstance(v, (int, float)) or isinstance(v, complex) or math.isnan(float(v)):
                raise ScorerError(
                    f"scorer '{self.name}' returned {k}={v!r} on {where}: scores must be numbers (or None for "
                    "'not applicable')"
                )
            scores[str(k)] = float(v)
        main = self.main if self.builtin else ("score" if "score" in scores else next(iter(scores), None))
        if main is not None and main != "score" and main in scores:
            scores["score"] = scores[main]
        return scores

    @property
    def metrics(self) -> tuple[str, ...] | None:
        """The metrics this scorer reports (None for a plug-in: known only from what it returns)."""
        if not self.builtin:
            return None
        return BUILTIN_METRICS[self.name] + (("score",) if self.main else ())

    def direction(self, metric: str) -> str:
        """'maximize' or 'minimize' for one of this scorer's metrics: a plug-in may say with a `directions`
        attribute on its function ({metric: 'minimize'}); anything else is maximised."""
        return metric_direction(metric, getattr(self.fn, "directions", None))


def load_plugin(spec: str, where: str) -> ScoreFn:
    """Import `package.module:function`.

    Args:
        spec: the config value, e.g. "my_pkg.scorers:accuracy".
        where: the config key, for the error (e.g. "mixture.sources.arith.scorer").

    Raises:
        ConfigError: not of the form module:function, the module does not import, or the function is missing or not
            callable.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ConfigError(
            f"{where}: '{spec}' is neither a built-in scorer ({', '.join(BUILTINS)}) nor 'package.module:function'. "
            "Use one of the built-ins or point at your function, e.g. my_pkg.scorers:accuracy"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - ImportError, or whatever the module raises while importing
        raise ConfigError(
            f"{where}: module '{module_name}' of scorer '{spec}' does not import ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}). Check the name and that it is on PYTHONPATH "
            "(or installed)"
        ) from e
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ConfigError(
                f"{where}: module '{module_name}' has no '{attr}' (scorer '{spec}'). Check the function's name"
            )
    if not callable(fn):
        raise ConfigError(f"{where}: '{spec}' is a {type(fn).__name__}, not a function")
    return fn


def resolve_scorer(name: str, args: dict[str, Any] | None, where: str) -> Scorer:
    """The scorer a source names, checked: a built-in with its required args (and no unknown ones), or a plug-in.

    Args:
        name: `mixture.sources.<name>.scorer`.
        args: `mixture.sources.<name>.scorer_args` (None or {} when unset).
        where: the source's config key, `mixture.sources.<name>`, for errors.

    Raises:
        ConfigError: unknown scorer, missing / unknown / invalid args, a plug-in that does not import.
    """
    args = dict(args or {})
    if name in BUILTINS:
        fn, required, optional, main = BUILTINS[name]
        for a in required:
            if a not in args:
                example = " e.g. '(-?\\d+)\\.?$'" if a == "pattern" else ""
                raise ConfigError(
                    f"{where}.scorer_args.{a}: scorer '{name}' needs it. Set {where}.scorer_args.{a}{example}"
                )
        for a in args:
            if a not in required + optional:
                known = ", ".join(required + optional) or "none"
                raise ConfigError(
                    f"{where}.scorer_args.{a}: not an argument of scorer '{name}' (its arguments: {known}). "
                    f"Remove it (on the command line: ~{where}.scorer_args.{a})"
                )
        if name == "regex":
            if not isinstance(args["pattern"], str):
                raise ConfigError(f"{where}.scorer_args.pattern: must be a string, got {args['pattern']!r}")
            try:
                _compile(args["pattern"], bool(args.get("ignore_case", False)))
            except re.error as e:
                raise ConfigError(
                    f"{where}.scorer_args.pattern: '{args['pattern']}' is not a valid regular expression ({e}). "
                    "Fix the pattern (Python `re` syntax)"
                ) from e
        return Scorer(name, fn, args, main, builtin=True)
    if ":" not in name:
        raise ConfigError(
            f"{where}.scorer: unknown scorer '{name}'. Use one of {', '.join(BUILTINS)}, or a Python function as "
            "'package.module:function'"
        )
    fn = load_plugin(name, f"{where}.scorer")
    try:
        inspect.signature(fn).bind(None, None, None, None, **args)
    except TypeError as e:
        raise ConfigError(
            f"{where}.scorer_args: scorer '{name}' cannot be called as fn(prompt_messages, reference, generation, "
            f"row{''.join(f', {k}=...' for k in args)}): {e}. Give it those parameters, or drop them "
            f"(on the command line: ~{where}.scorer_args.<key>)"
        ) from e
    except ValueError:  # no signature to check (a builtin or C function): it is called as is
        pass
    return Scorer(name, fn, args, None, builtin=False)


# ----------------------------------------------------------------------------------------------------- compliance
def think_ok(generation: str, think: bool) -> bool:
    """Mode compliance of one generated turn (see the module docstring).

    Args:
        generation: the generated text, end-of-turn token removed.
        think: the turn was prompted in /think mode.
    """
    if not think:
        rest = _EMPTY_THINK_RE.sub("", generation)
        return THINK_OPEN not in rest and THINK_CLOSE not in rest
    text = generation.lstrip()
    if not text.startswith(THINK_OPEN) or text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        return False
    return bool(text.split(THINK_CLOSE, 1)[1].strip())


def compliance(
    generation: str, stopped: bool, new_tokens: int, think: bool, control_tokens: Iterable[str]
) -> dict[str, float]:
    """stops, think_ok, role_leak, mean_new_tokens of one generated turn.

    Args:
        generation: the generated text (special tokens kept, the final end-of-turn token removed).
        stopped: the end-of-turn token was generated within max_new_tokens.
        new_tokens: generated tokens, the end-of-turn token included.
        think: the turn was prompted in /think mode.
        control_tokens: texts whose presence in a reply is a role leak (the tokenizer's special tokens).
    """
    leak = any(t and t in generation for t in control_tokens)
    return {
        "stops": float(stopped),
        "think_ok": float(think_ok(generation, think)),
        "role_leak": float(leak),
        "mean_new_tokens": float(new_tokens),
    }


# ---------------------------------------------------------------------------------------------------- aggregation
def metric_direction(metric: str, directions: dict[str, str] | None = None) -> str:
    """'minimize' for role_leak and mean_new_tokens (and plug-in metrics declared so), else 'maximize'.

    A mode suffix (`think_ok/think`) has the direction of its metric."""
    base = metric.split("/", 1)[0]
    if directions and base in directions:
        d = str(directions[base]).lower()
        return "minimize" if d.startswith("min") else "maximize"
    return "minimize" if base in MINIMIZE else "maximize"


def aggregate(records: list[tuple[str, dict[str, float | None]]]) -> dict[str, dict[str, Any]]:
    """Mean of every metric over the turns that report it, overall and per reasoning mode.

    Args:
        records: (mode, scores) per generated turn; mode is 'think' or 'no_think'.

    Returns:
        {metric: {"all": mean, "think": mean or None, "no_think": mean or None, "n": turns counted}}; a None score
        (not applicable) leaves the turn out of that metric.
    """
    sums: dict[str, dict[str, list[float]]] = {}
    for mode, scores in records:
        for k, v in scores.items():
            if v is None:
                continue
            slot = sums.setdefault(k, {"all": [], "think": [], "no_think": []})
            slot["all"].append(v)
            slot[mode].append(v)
    out: dict[str, dict[str, Any]] = {}
    for k, slot in sums.items():
        out[k] = {m: (round(sum(vs) / len(vs), 6) if vs else None) for m, vs in slot.items()}
        out[k]["n"] = len(slot["all"])
    return out


def flat_block(per_source: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """The `eval_generate` block of metrics.json: source -> metric -> value, and `all`.

    Args:
        per_source: source -> the `aggregate` result of its turns.

    Returns:
        {source: {metric: overall mean, "metric/think": ..., "metric/no_think": ...}, "all": {...}} where a mode key
        is present when the source had turns of that mode. `all` is the macro mean: each metric (and mode key)
        averaged over the sources that report it, each source counting once whatever its number of turns.
    """
    block: dict[str, dict[str, float]] = {}
    for name, metrics in per_source.items():
        flat: dict[str, float] = {}
        for metric, v in metrics.items():
            if v.get("all") is not None:
                flat[metric] = v["all"]
            for mode in MODES:
                if v.get(mode) is not None:
                    flat[f"{metric}/{mode}"] = v[mode]
        block[name] = flat
    keys: dict[str, list[float]] = {}
    for flat in block.values():
        for k, v in flat.items():
            keys.setdefault(k, []).append(v)
    block["all"] = {k: round(sum(vs) / len(vs), 6) for k, vs in keys.items()}
    return block


# ------------------------------------------------------------------------------------------------------ objective
def parse_objective(objective: str) -> tuple[str, str] | None:
    """`gen/<source or all>/<metric>[/think|/no_think]` -> (source, metric); None when it is not a gen objective."""
    if not objective.startswith("gen/"):
        return None
    parts = objective.split("/", 2)
    if len(parts) != 3 or not parts[1] or not parts[2]:
        return ("", "")
    return parts[1], parts[2]


def check_objective(objective: str, scorers: dict[str, Scorer]) -> str:
    """Check a `gen/...` sweep objective against the mixture's scorers; returns its direction.

    Args:
        objective: `sweep.objective`, starting with 'gen/'.
        scorers: source name -> its resolved scorer.

    Raises:
        ConfigError: malformed, an unknown source, a metric no scorer of that source (or of any source, for `all`)
            reports, or a mode suffix other than think / no_think.
    """
    parsed = parse_objective(objective)
    assert parsed is not None
    source, metric = parsed
    if not source:
        raise ConfigError(
            f"sweep.objective: '{objective}' is not gen/<source or all>/<metric>. E.g. gen/all/score, "
            "gen/tools/json_tool_call, gen/all/think_ok/think"
        )
    if source != "all" and source not in scorers:
        raise ConfigError(
            f"sweep.objective: '{source}' in '{objective}' is neither 'all' nor a source of the mixture. "
            f"Use all or one of {sorted(scorers)}"
        )
    base, _, mode = metric.partition("/")
    if mode and mode not in MODES:
        raise ConfigError(
            f"sweep.objective: mode '{mode}' in '{objective}' is not think or no_think. E.g. gen/all/think_ok/think"
        )
    pool = [scorers[source]] if source != "all" else list(scorers.values())
    known = set(COMPLIANCE_METRICS)
    open_ended = False
    for s in pool:
        ms = s.metrics
        if ms is None:
            open_ended = True
        else:
            known.update(ms)
    if base not in known and not open_ended:
        raise ConfigError(
            f"sweep.objective: no scorer of {'the mixture' if source == 'all' else f'source {source}'} reports "
            f"metric '{base}' (reported: {sorted(known)}). Choose one of them, or set a scorer "
            f"(mixture.sources.<name>.scorer)"
        )
    directions = None
    for s in pool:
        directions = getattr(s.fn, "directions", None) or directions
    return metric_direction(base, directions)


def objective_value(block: dict[str, dict[str, float]], objective: str) -> float | None:
    """The raw value of a `gen/...` objective in an `eval_generate` block (None when the run did not report it)."""
    parsed = parse_objective(objective)
    if parsed is None or not parsed[0]:
        return None
    source, metric = parsed
    return (block.get(source) or {}).get(metric)


def sweeper_value(run: Any, metrics: dict[str, Any]) -> float | None:
    """What launch.py returns to the sweeper for a `gen/...` objective: the metric's value, negated when higher is
    better, since the sweepers here minimise (the Optuna presets' `direction: minimize`). None when not reported.

    Args:
        run: the RunConfig (its sweep.objective and the mixture's scorers, for the metric's direction).
        metrics: the run's metrics (metrics.json), with its `eval_generate` block.
    """
    objective = run.sweep.objective
    value = objective_value(metrics.get("eval_generate") or {}, objective)
    if value is None:
        return None
    scorers = {
        name: resolve_scorer(s.scorer, dict(s.scorer_args or {}), f"mixture.sources.{name}")
        for name, s in run.mixture.sources.items()
    }
    return -value if check_objective(objective, scorers) == "maximize" else value
