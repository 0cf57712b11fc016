"""eval.harness: benchmarks through EleutherAI's lm-evaluation-harness (the `lm-eval` package, an optional extra).

    python launch.py eval.harness.tasks=[sftexp_demo]                       # after training, in the same job
    python launch.py eval.harness.tasks=[hellaswag] eval.harness.limit=200  # a hub task (needs its dataset)
    python -m sft_exp.evaluate <run dir or checkpoint> --harness sftexp_demo   # a trained model, no training

What is ours is small: the task check before training (`check_tasks`), the model handed to lm-eval's own `HFLM`
(the run's saved final model and tokenizer, so its chat template and end-of-turn token are the trained ones), and
where the scores go. lm-eval does the rest (task files, prompts, few-shot, batching, metrics, stderr).

When it runs: after training and the final save, on rank 0 alone, reloading the saved model (correct for every
strategy: under ZeRO-3 or FSDP no rank holds the whole model in memory), before metrics.json is written, so the
scores are in metrics.json, the tracker's summary and the sweep index. Under Slurm that is inside the training job
(no second queue wait). A failure there (a task whose dataset is missing, a bad metric) never loses the run: the
model is saved; metrics.json carries `eval_harness_error` and the run then exits with it (sft_exp.eval.hooks).

What a run writes: `<run dir>/eval_harness.json` (lm-eval's results, configs and versions per task; the first
`eval.harness.samples` examples of each task with prompt, target, reply and scores) and in metrics.json the blocks
`eval_harness` ({task: {metric: value}}, the metric named `<metric>` for lm-eval's `none` filter and
`<metric>_<filter>` otherwise), `eval_harness_higher_is_better` (the direction of each, as lm-eval defines it)
and `eval_harness_seconds`. A sweep can optimise one: `sweep.objective=harness/<task>/<metric>`.
"""

from __future__ import annotations

import difflib
import gc
import logging
import sys
import time
from pathlib import Path
from typing import Any

from sft_exp.errors import ConfigError, SftExpError
from sft_exp.rundir import RunDir

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "harness"  # the demo tasks (sftexp_demo)


class HarnessError(SftExpError):
    """lm-eval failed on a task (after training: the run is kept, see the module docstring)."""


def include_paths(h: Any) -> list[str]:
    """The shipped demo tasks, then the user's folders (later ones override earlier task names)."""
    return [str(SHIPPED), *(str(Path(p).resolve()) for p in h.include_path)]


def task_manager(h: Any) -> Any:
    """lm-eval's TaskManager over the include paths, and over lm-eval's own ~15k task files only when a task needs
    them (indexing those takes seconds)."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=include_paths(h), include_defaults=False)
    if all(t in local.all_tasks for t in h.tasks):
        return local
    return TaskManager(include_path=include_paths(h))


def check_tasks(h: Any, load: bool = False) -> Any:
    """Every name in eval.harness.tasks is a task, group or tag lm-eval knows, and with `load` (the launcher passes
    eval.harness.check_data) every task builds, its dataset loaded; returns the TaskManager.

    Raises:
        ConfigError: an `eval.harness.extra` key simple_evaluate does not take, an unknown name (with the closest
            known ones), or a task that does not load (a dataset missing offline, a broken YAML), before the run
            directory exists.
    """
    import inspect

    from lm_eval import simple_evaluate

    _quiet_lm_eval()
    allowed = set(inspect.signature(simple_evaluate).parameters) - {"model", "model_args", "tasks", "task_manager"}
    for key in h.extra:
        if key not in allowed:
            raise ConfigError(
                f"eval.harness.extra.{key}: is not an argument of lm_eval.simple_evaluate. Use one of {sorted(allowed)}"
            )
    tm = task_manager(h)
    known = set(tm.all_tasks)
    for i, name in enumerate(h.tasks):
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=4, cutoff=0.6)
            raise ConfigError(
                f"eval.harness.tasks[{i}]: '{name}' is no lm-eval task, group or tag"
                + (f" (close: {', '.join(close)})" if close else "")
                + f". Local tasks are looked up in {', '.join(include_paths(h))} (add folders with "
                "eval.harness.include_path=[...]); `lm-eval ls tasks` lists lm-eval's own"
            )
    if load:
        for i, name in enumerate(h.tasks):
            try:
                tm.load([name])
            except Exception as e:  # noqa: BLE001 - lm-eval and datasets raise many kinds; all mean "cannot load"
                first = str(e).splitlines()[0][:300] if str(e) else ""
                raise ConfigError(
                    f"eval.harness.tasks[{i}]: lm-eval cannot load '{name}': {type(e).__name__}: {first}. A hub "
                    "task's dataset must be in the HF cache on an offline machine (load it once where the hub is "
                    "reachable); a local task's data_files must exist. Or eval.harness.check_data=false to find out "
                    "after training"
                ) from e
    return tm


def _quiet_lm_eval() -> None:
    """lm-eval logs every task's setup at INFO and warns on each custom loader (the shipped tasks' data.py)."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)

    class _NoHints(logging.Filter):
        # hints that do not apply here: custom loaders are ours; the model is handed over on purpose, single-process
        def filter(self, record: logging.LogRecord) -> bool:
            return not any(h in record.getMessage() for h in _SILENCED)

    for name in ("lm_eval.api.task", "lm_eval.models.huggingface", "lm_eval"):
        logger = logging.getLogger(name)
        if not any(type(f).__name__ == "_NoHints" for f in logger.filters):
            logger.addFilter(_NoHints())


_SILENCED = ("Custom kwargs can be passed", "is not of type `str`", "Passed an already-initialized model")


def _think_end(tokenizer: Any, marker: str | None) -> str | int | None:
    """The end-of-thinking marker as lm-eval wants it: its token id when the tokenizer has it as one token (a special
    token would be dropped from the decoded reply before a string split could find it), else the string."""
    if not marker:
        return None
    ids = tokenizer.convert_tokens_to_ids([marker])
    unk = getattr(tokenizer, "unk_token_id", None)
    return int(ids[0]) if ids and ids[0] is not None and ids[0] != unk else marker


def _metric_name(key: str) -> tuple[str, bool] | None:
    """lm-eval's 'acc,none' -> ('acc', False); 'exact_match,last_number' -> ('exact_match_last_number', False);
    '*_stderr,...' -> (.., True); 'alias' / 'samples' -> None."""
    metric, sep, filt = key.partition(",")
    if not sep:
        return None
    stderr = metric.endswith("_stderr")
    metric = metric.removesuffix("_stderr")
    return (metric if filt == "none" else f"{metric}_{filt}", stderr)


def summarise(results: dict[str, Any]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, bool]]]:
    """lm-eval's results -> ({task: {metric: value}}, {task: {metric: higher is better}}), groups included."""
    block: dict[str, dict[str, float]] = {}
    better: dict[str, dict[str, bool]] = {}
    hib = results.get("higher_is_better") or {}
    for task, row in (results.get("results") or {}).items():
        for key, value in row.items():
            name = _metric_name(key)
            if name is None or name[1] or not isinstance(value, (int, float)):
                continue
            block.setdefault(task, {})[name[0]] = round(float(value), 6)
            metric = key.partition(",")[0]
            if metric in (hib.get(task) or {}):
                better.setdefault(task, {})[name[0]] = bool(hib[task][metric])
    return block, better


def _samples(results: dict[str, Any], n: int) -> dict[str, list[dict[str, Any]]]:
    """The first n examples of each task: prompt, target, reply (filtered) and scores."""
    out: dict[str, list[dict[str, Any]]] = {}
    for task, rows in (results.get("samples") or {}).items():
        metrics = {k.partition(",")[0] for k in ((results.get("results") or {}).get(task) or {})}
        kept = []
        for s in rows[:n]:
            args = s.get("arguments") or []
            first = args[0] if args else None
            prompt = first[0] if isinstance(first, (list, tuple)) and first else first
            kept.append(
                {
                    "prompt": str(prompt)[-2000:],  # the end of it: a long system prompt is the same on every row
                    "target": s.get("target"),
                    "reply": s.get("resps"),  # the generation(s), or (log-likelihood, greedy) per choice
                    "filtered": s.get("filtered_resps"),  # what the metric saw (e.g. the last number of the reply)
                    "scores": {k: s[k] for k in s if k in metrics},
                }
            )
        out[task] = kept
    return out


def evaluate(model: Any, tokenizer: Any, h: Any, tm: Any = None) -> dict[str, Any]:
    """Run lm-eval's tasks on a loaded model; returns what eval_harness.json holds.

    Args:
        model: a transformers causal LM (eval mode, on its device).
        tokenizer: the run's tokenizer (its chat template is the one the prompts go through).
        h: the eval.harness config (HarnessConfig).
        tm: a TaskManager from check_tasks (None: built here).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    _quiet_lm_eval()
    tm = tm or check_tasks(h)
    think_end = _think_end(tokenizer, h.think_end_token)
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=h.batch_size,
        # lm-eval refuses enable_thinking without a marker; without thinking, a marker is harmless (not found)
        enable_thinking=h.enable_thinking,
        think_end_token=think_end,
    )
    started = time.time()
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(h.tasks),
        task_manager=tm,
        limit=h.limit,
        num_fewshot=h.num_fewshot,
        apply_chat_template=h.apply_chat_template,
        gen_kwargs=dict(h.gen_kwargs) or None,
        log_samples=h.samples > 0,
        **dict(h.extra),
    )
    seconds = round(time.time() - started, 2)
    block, better = summarise(results)
    return {
        "tasks": list(h.tasks),
        "eval_harness": block,
        "higher_is_better": better,
        "seconds": seconds,
        "settings": {
            "limit": h.limit,
            "num_fewshot": h.num_fewshot,
            "apply_chat_template": h.apply_chat_template,
            "enable_thinking": h.enable_thinking,
            "think_end_token": h.think_end_token,
            "gen_kwargs": dict(h.gen_kwargs),
        },
        "n_samples": results.get("n-samples"),
        "configs": results.get("configs"),
        "versions": results.get("versions"),
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "samples": _samples(results, h.samples),
    }


def format_table(res: dict[str, Any]) -> str:
    """Scores as aligned lines: task, metric, value (and direction)."""
    lines = [f"harness ({res['seconds']:.1f} s, lm-eval {res.get('lm_eval_version')}):"]
    for task, metrics in res["eval_harness"].items():
        n = ((res.get("n_samples") or {}).get(task) or {}).get("effective")
        for metric, value in metrics.items():
            up = (res["higher_is_better"].get(task) or {}).get(metric)
            arrow = "" if up is None else (" (higher is better)" if up else " (lower is better)")
            lines.append(f"  {task:<28} {metric:<28} {value:.4f}{arrow}" + (f"  n={n}" if n else ""))
    return "\n".join(lines)


def after_training(run: Any, run_dir: Path, tracker: Any = None, step: int = 0) -> dict[str, Any]:
    """eval.harness after training (rank 0; other ranks and eval.harness.tasks=[] get {}): reload the saved model,
    evaluate, write eval_harness.json, log to the tracker; returns the metrics.json entries. Never raises: a failure
    is `eval_harness_error` (sft_exp.eval.hooks.raise_after_save reports it once metrics.json is written)."""
    from sft_exp.io import write_json
    from sft_exp.ranks import is_main_process

    h = run.eval.harness
    if not h.tasks or not is_main_process():
        return {}
    try:
        import torch

        gc.collect()  # the training model and optimizer state are dropped before a second copy is loaded
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        from sft_exp.eval.saved import load_trained

        _, tokenizer, model, _, model_dir = load_trained(Path(run_dir))
        res = evaluate(model, tokenizer, h)
        res["model"] = str(model_dir)
        write_json(RunDir(run_dir).eval_harness, res)
        print(format_table(res), flush=True)
        if tracker is not None:
            tracker.log(scalars(res["eval_harness"]), step)
        del model
        return {
            "eval_harness": res["eval_harness"],
            "eval_harness_higher_is_better": res["higher_is_better"],
            "eval_harness_seconds": res["seconds"],
            "eval_harness_error": None,
        }
    except Exception as e:  # noqa: BLE001 - the run is saved; the failure is reported after metrics.json
        first = str(e).splitlines()[0][:300] if str(e) else ""
        print(f"warning: eval.harness failed: {type(e).__name__}: {first}", file=sys.stderr, flush=True)
        return {
            "eval_harness": None,
            "eval_harness_error": f"eval.harness: lm-eval on {list(h.tasks)} failed: {type(e).__name__}: {first}",
        }


def scalars(block: dict[str, dict[str, float]]) -> dict[str, float]:
    """{harness/<task>/<metric>: value} for the trackers."""
    return {f"harness/{t}/{m}": v for t, ms in block.items() for m, v in ms.items()}
