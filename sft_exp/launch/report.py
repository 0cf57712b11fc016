"""What every command prints last: what ran, how good it was, where the results are, and what to run next; and the
copy of the console output kept in <run dir>/train.log."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from sft_exp.config import Mode, RunConfig
from sft_exp.launch.job import HydraJob
from sft_exp.rundir import RunDir, shell_word

RULE = "=" * 100
FRESH = ("resume=", "mode=")  # overrides a suggested new command leaves out


class _Tee:
    """A text stream that writes to the console and to a log file (progress-bar redraws included, as shown)."""

    def __init__(self, console: IO[str], log: IO[str]) -> None:
        self.console, self.log = console, log

    def write(self, text: str) -> int:
        with contextlib.suppress(OSError, ValueError):  # a full disk or a closed log never stops the run
            self.log.write(text)
        return self.console.write(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.log.flush()
        self.console.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...: the console's
        return getattr(self.console, name)


@contextlib.contextmanager
def console_copied_to(path: Path) -> Iterator[None]:
    """Copy everything printed to stdout and stderr in this process (and by the local ranks it starts, whose output
    it relays) into `path`, appended (a resumed run adds to the same file)."""
    try:
        log = open(path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115 - closed below
    except OSError as e:
        print(f"warning: cannot write {path}: {e}; the console output is not kept", file=sys.stderr)
        yield
        return
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err
        with contextlib.suppress(OSError):
            log.close()


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{seconds:.1f} s"


def _num(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) else f"{v:.4f}" if isinstance(v, float) else str(v)


def _change(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return _num(after) if after is not None else "-"
    pct = f" ({(after - before) / before:+.1%})" if before else ""
    return f"{before:.4f} -> {after:.4f}{pct}"


def train_summary(run: RunConfig, run_dir: Path, metrics: dict[str, Any], job: HydraJob) -> str:
    """The end of a training run: steps, tokens, speed, eval loss before -> after per source, generation metrics,
    where the model is and how to load it, and the next commands."""
    rd = RunDir(run_dir)
    seconds = float(metrics.get("wall_seconds") or metrics.get("train_runtime_seconds") or 0.0)
    resumed = f", resumed from {metrics['resumed_from']}" if metrics.get("resumed_from") else ""
    lines = [
        RULE,
        f"finished: {metrics.get('global_steps', 0)} steps{resumed}, {_num(metrics.get('train_tokens_seen', 0))} "
        f"tokens ({_num(metrics.get('trained_tokens', 0))} trained) in {_duration(seconds)}, "
        f"{metrics.get('train_tokens_per_second', 0.0):,.0f} tokens/s",
    ]
    before, after = metrics.get("eval_loss_before") or {}, metrics.get("eval_loss_after") or {}
    if after:
        lines.append("eval loss per source, before -> after training:")
        width = max(len(n) for n in after)
        lines += [f"  {n.ljust(width)}  {_change(before.get(n), after[n])}" for n in sorted(after, key=_all_last)]
    gen, gen_before = metrics.get("eval_generate") or {}, metrics.get("eval_generate_before") or {}
    if gen.get("all"):
        keys = [k for k in ("score", "stops", "think_ok", "role_leak", "mean_new_tokens") if k in gen["all"]]
        lines.append("generation on held-out turns (all sources), before -> after:")
        lines += [f"  {k.ljust(15)}  {_change((gen_before.get('all') or {}).get(k), gen['all'][k])}" for k in keys]
        lines.append(f"  per source and per think/no_think mode: {rd.eval_generate}")
    if metrics.get("eval_generate_error"):
        lines.append(f"generation eval failed: {metrics['eval_generate_error']}")
    harness = metrics.get("eval_harness") or {}
    if harness:
        up = metrics.get("eval_harness_higher_is_better") or {}
        lines.append(f"lm-eval scores after training ({metrics.get('eval_harness_seconds', 0):.0f} s):")
        width = max(len(f"{t}/{m}") for t, ms in harness.items() for m in ms)
        for task, ms in harness.items():
            for m, v in ms.items():
                better = (up.get(task) or {}).get(m)
                arrow = "" if better is None else "  (higher is better)" if better else "  (lower is better)"
                lines.append(f"  {f'{task}/{m}'.ljust(width)}  {_num(v)}{arrow}")
        lines.append(f"  prompts, replies and lm-eval's task configs: {rd.eval_harness}")
    if metrics.get("eval_harness_error"):
        lines.append(f"lm-eval failed: {metrics['eval_harness_error']}")
    peft = metrics.get("peft") or {}
    model_dir = peft.get("merged_dir") or str(run_dir)
    how = "PeftModel adapter" if peft and not peft.get("merged_dir") else "model"
    lines += [
        f"results:  {run_dir}  (metrics.json, mixture_stats.json, train.log, trainer_state.json)",
        f"load it:  AutoModelForCausalLM.from_pretrained('{model_dir}')  + AutoTokenizer (its chat template inside)"
        if how == "model"
        else f"load it:  AutoPeftModelForCausalLM.from_pretrained('{model_dir}')  (an adapter on {peft.get('base')})",
        "next:",
        f"  python -m sft_exp.tools.compare {shell_word(str(run_dir))}   # tables and plots against other runs",
        f"  python -m sft_exp.evaluate {shell_word(str(run_dir))}   # generation eval on held-out rows",
        f"  {job.command('mode=inspect', drop=FRESH)}   # the rows as trained: trained tokens highlighted",
    ]
    if job.multirun:
        sweep = Path(job.output_dir).parent
        lines.append(f"  python -m sft_exp.tools.compare {shell_word(str(sweep))}   # the whole sweep")
    lines.append(RULE)
    return "\n".join(lines)


def prepare_summary(run_dir: Path, stats: dict[str, Any], job: HydraJob) -> str:
    """The end of mode=prepare: rows and tokens of the mixture, packing, cache, and how to train on it."""
    t, p, c = stats.get("total", {}), stats.get("packing", {}), stats.get("cache", {})
    return "\n".join(
        [
            RULE,
            f"prepared: {len(stats.get('sources', {}))} sources, {_num(t.get('rows', 0))} training rows "
            f"({_num(t.get('tokens', 0))} tokens, {_num(t.get('trained_tokens', 0))} trained), "
            f"{_num(t.get('rows_heldout', 0))} held out; {_num(p.get('bins', 0))} packed rows of {p.get('max_length')} "
            f"tokens, efficiency {p.get('efficiency', 0.0):.4f}; cache {c.get('hits', 0)} hit / {c.get('misses', 0)} "
            f"miss in {c.get('dir')}",
            f"results:  {RunDir(run_dir).mixture_stats}",
            f"next:     {job.command(drop=FRESH)}   # train on it (the cache makes preparation instant)",
            RULE,
        ]
    )


def inspect_summary(run_dir: Path, result: dict[str, Any], job: HydraJob) -> str:
    return "\n".join(
        [
            RULE,
            f"inspected: {result.get('rows', '?')} rows; open {RunDir(run_dir).inspect_html} in a browser "
            "(trained tokens highlighted, token ids on hover)",
            f"next:      {job.command(drop=FRESH)}   # train",
            RULE,
        ]
    )


def final_summary(run: RunConfig, run_dir: Path, result: dict[str, Any], job: HydraJob) -> str:
    if run.mode == Mode.prepare:
        return prepare_summary(run_dir, result, job)
    if run.mode == Mode.inspect:
        return inspect_summary(run_dir, result, job)
    return train_summary(run, run_dir, result, job)


def _all_last(name: str) -> tuple[bool, str]:
    return (name == "all", name)
