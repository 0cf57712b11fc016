"""What a run is judged on: `sweep.objective` (the value launch.py returns to the sweeper), `compare --objective`
and `mixsearch --objective`, read from a run's final metrics (metrics.json, or the sweep index's copy of it).

    all | <source>                                   eval loss after training (eval_loss_after), minimised
    gen/<source or all>/<metric>[/think|/no_think]   a generation metric (eval_generate; sft_exp.eval.scorers)
    harness/<task>/<metric>                          an lm-evaluation-harness score (eval_harness; eval.harness)

A generation metric's direction is its scorer's (metric_direction: role_leak and mean_new_tokens are minimised,
the rest maximised); a harness score's is lm-eval's own (`eval_harness_higher_is_better` in metrics.json).
"""

from __future__ import annotations

import math
from typing import Any

SCORED = ("gen/", "harness/")  # prefixes of the objectives that are not an eval loss
_LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "loss")  # harness metrics, when a run did not record a direction


def kind(objective: str) -> str:
    """'gen', 'harness' or 'loss'."""
    return objective.split("/", 1)[0] if objective.startswith(SCORED) else "loss"


def parts(objective: str) -> tuple[str, str]:
    """gen/<a>/<b> or harness/<a>/<b> -> (a, b); ('', '') when malformed."""
    parts = objective.split("/", 2)
    return (parts[1], parts[2]) if len(parts) == 3 and parts[1] and parts[2] else ("", "")


def value(final: dict[str, Any], objective: str) -> float | None:
    """The objective's raw value in a run's final metrics; None when the run did not report it (or not finite)."""
    k = kind(objective)
    if k == "loss":
        v = (final.get("eval_loss_after") or {}).get(objective)
    else:
        where, metric = parts(objective)
        block = final.get("eval_generate" if k == "gen" else "eval_harness") or {}
        v = (block.get(where) or {}).get(metric)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def direction(objective: str, final: dict[str, Any] | None = None) -> str:
    """'minimize' or 'maximize'. A harness score's direction comes from the run's metrics when given."""
    k = kind(objective)
    if k == "loss":
        return "minimize"
    where, metric = parts(objective)
    if k == "gen":
        from sft_exp.eval.scorers import metric_direction

        return metric_direction(metric)
    up = ((final or {}).get("eval_harness_higher_is_better") or {}).get(where, {}).get(metric)
    if up is None:
        up = not any(w in metric for w in _LOWER_IS_BETTER)
    return "maximize" if up else "minimize"


def to_minimise(final: dict[str, Any], objective: str) -> float | None:
    """What a minimising sweeper gets: the value, negated when higher is better."""
    v = value(final, objective)
    if v is None:
        return None
    return -v if direction(objective, final) == "maximize" else v


def label(objective: str) -> str:
    """eval_loss_after.<source> for a loss; gen/... or harness/... with its direction (e.g. '(max)')."""
    if kind(objective) == "loss":
        return f"eval_loss_after.{objective}"
    return f"{objective} ({direction(objective)[:3]})"


def words(objective: str) -> str:
    """The objective in a sentence (compare.md)."""
    k = kind(objective)
    if k == "gen":
        return f"generation metric `{objective}` after training ({direction(objective)}d)"
    if k == "harness":
        return f"lm-eval score `{objective}` after training ({direction(objective)}d)"
    where = "all sources (trained-token weighted)" if objective == "all" else f"source `{objective}`"
    return f"eval loss after training, {where}"


def best(values: list[tuple[Any, float]], objective: str, final: dict[str, Any] | None = None) -> Any:
    """The item of (item, value) pairs whose value is best in the objective's direction (None when empty)."""
    if not values:
        return None
    pick = max if direction(objective, final) == "maximize" else min
    return pick(values, key=lambda iv: iv[1])[0]
