"""What every process runs: the frozen config of a run directory -> a stage (prepare or train)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sft_exp.config import Mode, RunConfig
from sft_exp.rundir import cache_dir, load_frozen, write_json

log = logging.getLogger("sft_exp")


def prepare(run: RunConfig, run_dir: Path) -> tuple[Any, Any]:
    """Tokenizer + prepared data; writes mixture_stats.json and prints the resolved mixture before any training."""
    from sft_exp.data.pipeline import format_table, prepare_data
    from sft_exp.model import build_tokenizer

    tokenizer = build_tokenizer(run)
    data = prepare_data(run, tokenizer, cache_dir(run))
    write_json(run_dir / "mixture_stats.json", data.stats)
    print("\nresolved mixture\n" + format_table(data.stats) + "\n", flush=True)
    return tokenizer, data


def execute(run_dir: Path, started: float | None = None) -> dict[str, Any]:
    """Run the stage the frozen config asks for; returns the metrics (or the mixture stats for mode=prepare)."""
    started = started or time.time()
    run = load_frozen(run_dir)
    tokenizer, data = prepare(run, run_dir)
    if run.mode == Mode.prepare:
        return data.stats

    from sft_exp.model import build_model
    from sft_exp.train import run_training

    model = build_model(run, tokenizer)
    metrics = run_training(run, model, tokenizer, data, run_dir)
    metrics["wall_seconds"] = round(time.time() - started, 2)
    write_json(run_dir / "metrics.json", metrics)  # written last: its presence marks a finished run
    return metrics
