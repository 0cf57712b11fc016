"""Generation eval of a trained model, without training: writes the eval_generate.json a run writes.

    python -m sft_exp.evaluate outputs/runs/<date>/<time>                     # the run's final model, its config
    python -m sft_exp.evaluate outputs/runs/<date>/<time>/checkpoint-40       # a checkpoint of it
    python -m sft_exp.evaluate <run> --rows 0 --sources arith,tools           # every held-out row of two sources
    python -m sft_exp.evaluate <run> --data mine=path/to/rows.jsonl --scorer mine=exact_match
    python -m sft_exp.evaluate <run> --scorer arith=regex --scorer-args 'arith={"pattern": "(-?\\d+)\\.?$"}'
    python -m sft_exp.evaluate <run> --harness sftexp_demo,hellaswag --limit 100   # lm-eval tasks instead
    python -m sft_exp.evaluate <run> --harness sftexp_demo --base     # the model the run started from, to compare

The run's frozen config (run_config.yaml) gives the mixture, the held-out rows (the same rows the run evaluated on,
unless --test-split-size / --seed draw others; rows the run trained on may then be among them), the scorers and the
eval.generate settings; options override them. --data adds a source from a conversation file (any format a source
takes): its first --rows valid rows. The model and tokenizer are the ones saved in the directory (a peft run's
merged/ model when there is one). Output: <dir>/eval_generate.json, or eval_generate-<time>.json beside it when
that exists (the run's own results are never overwritten), or --out. Exit code 2 on bad input, and when a scorer
fails (after the results are written).

--harness runs lm-evaluation-harness tasks instead of the generation eval (sft_exp.eval.harness; the run's
eval.harness settings, these options over them) and writes eval_harness.json the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sft_exp.errors import ConfigError, SftExpError
from sft_exp.eval.saved import load_trained, locate


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"{flag} {item}: expected NAME=VALUE")
        out[name] = value
    return out


def _out_path(model_dir: Path, out: Path | None, stem: str = "eval_generate") -> Path:
    if out is not None:
        return out
    default = model_dir / f"{stem}.json"
    return default if not default.exists() else model_dir / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def main(argv: list[str] | None = None) -> int:
    """The CLI (see the module docstring). Returns the exit code: 0, or 2 on bad input or a failing scorer."""
    ap = argparse.ArgumentParser(
        prog="python -m sft_exp.evaluate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.add_argument("path", type=Path, help="a run directory or one of its checkpoint-N folders")
    ap.add_argument("--rows", type=int, help="rows per source (default eval.generate.rows; 0: every held-out row)")
    ap.add_argument("--sources", help="comma-separated sources of the mixture to evaluate (default: all)")
    ap.add_argument("--data", action="append", default=[], metavar="NAME=PATH", help="another source from a file")
    ap.add_argument("--scorer", action="append", default=[], metavar="NAME=SCORER", help="a source's scorer")
    ap.add_argument("--scorer-args", action="append", default=[], metavar="NAME=JSON", help="a source's scorer_args")
    ap.add_argument("--test-split-size", type=float, help="draw other held-out rows (mixture.test_split_size)")
    ap.add_argument("--seed", type=int, help="draw other held-out rows (mixture.seed)")
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--turns", choices=["all", "last"])
    ap.add_argument("--samples", type=int, help="rows per source whose generations are kept in the output")
    ap.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    ap.add_argument("--out", type=Path, help="output file (default: <dir>/eval_generate.json, never overwritten)")
    ap.add_argument("--harness", metavar="TASKS", help="comma-separated lm-eval tasks/groups/tags, run instead")
    ap.add_argument("--base", action="store_true", help="the model the run started from (its scores before training)")
    ap.add_argument("--limit", type=float, help="--harness: examples per task (or a share < 1)")
    ap.add_argument("--num-fewshot", type=int, help="--harness: few-shot examples")
    ap.add_argument("--include-path", action="append", default=[], help="--harness: a folder of task YAMLs")
    a = ap.parse_args(argv)
    try:
        return _harness(a) if a.harness else _evaluate(a)
    except (SftExpError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _harness(a: argparse.Namespace) -> int:
    """--harness: lm-eval's tasks on the saved model, with the run's eval.harness settings and these options."""
    from sft_exp.config.frozen import load_frozen
    from sft_exp.config.schema import validate_harness
    from sft_exp.eval import harness
    from sft_exp.io import write_json

    run = load_frozen(locate(a.path)[0])
    h = run.eval.harness
    h.tasks = [t.strip() for t in a.harness.split(",") if t.strip()]
    h.include_path = [*h.include_path, *a.include_path]
    for key in ("limit", "num_fewshot", "batch_size"):
        if getattr(a, key, None) is not None:
            setattr(h, key, getattr(a, key))
    validate_harness(run)
    tm = harness.check_tasks(h)  # before the model loads: a typo fails in a second
    _, tokenizer, model, _, model_dir = load_trained(a.path, a.device, base=a.base)
    res = harness.evaluate(model, tokenizer, h, tm)
    res["model"] = f"{run.model.name_or_path} (the run's starting model)" if a.base else str(model_dir)
    out = _out_path(model_dir, a.out, "eval_harness_base" if a.base else "eval_harness")
    write_json(out, res)
    print(harness.format_table(res))
    print(f"wrote {out}")
    return 0


def _evaluate(a: argparse.Namespace) -> int:
    from sft_exp.config import GenerateTurns
    from sft_exp.eval.generate import GenerationEval, format_table, write_results
    from sft_exp.eval.scorers import resolve_scorer

    run, tokenizer, model, run_dir, model_dir = load_trained(a.path, a.device, base=a.base)
    g = run.eval.generate
    for key in ("max_new_tokens", "batch_size", "samples"):
        if getattr(a, key) is not None:
            setattr(g, key, getattr(a, key))
    if a.turns:
        g.turns = GenerateTurns(a.turns)
    if a.test_split_size is not None:
        run.mixture.test_split_size = a.test_split_size
    if a.seed is not None:
        run.mixture.seed = a.seed
    data = _pairs(a.data, "--data")
    scorers = _pairs(a.scorer, "--scorer")
    scorer_args = {}
    for name, text in _pairs(a.scorer_args, "--scorer-args").items():
        try:
            scorer_args[name] = json.loads(text)
        except ValueError as e:
            example = name + '={"pattern": "(\\\\d+)"}'
            raise ConfigError(f"--scorer-args {name}: not JSON ({e}). e.g. '{example}'") from e
    clash = sorted(set(data) & set(run.mixture.sources))
    if clash:
        raise ConfigError(f"--data {clash[0]}: the mixture already has a source of that name. Name it differently")
    unknown = [n for n in (*scorers, *scorer_args) if n not in run.mixture.sources and n not in data]
    if unknown:
        raise ConfigError(
            f"--scorer {unknown[0]}: no such source. Use one of {sorted(run.mixture.sources)} or a --data name"
        )
    for name, src in run.mixture.sources.items():
        if name in scorers:
            src.scorer = scorers[name]
            src.scorer_args = scorer_args.get(name, {})
        elif name in scorer_args:
            src.scorer_args = scorer_args[name]
    extra = {
        name: (path, resolve_scorer(scorers.get(name, "none"), scorer_args.get(name), f"--data {name}"))
        for name, path in data.items()
    }
    sources = [s.strip() for s in a.sources.split(",") if s.strip()] if a.sources is not None else None
    gen = GenerationEval.from_run(run, tokenizer, rows=a.rows, sources=sources, extra=extra)
    results = gen.run(model, tokenizer, label="evaluate")
    results["model"] = f"{run.model.name_or_path} (the run's starting model)" if a.base else str(model_dir)
    out = _out_path(model_dir, a.out, "eval_generate_base" if a.base else "eval_generate")
    write_results(out, results)
    print(format_table(results))
    print(f"wrote {out}")
    if results["errors"]:
        print(f"error: {results['errors'][0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
