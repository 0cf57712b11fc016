"""What every process runs: the frozen config of a run directory -> a stage (prepare or train)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sft_exp.config import Mode, RunConfig
from sft_exp.config.frozen import cache_dir, load_frozen
from sft_exp.io import write_json
from sft_exp.rundir import RunDir

log = logging.getLogger("sft_exp")


def prepare(run: RunConfig, run_dir: Path, report: bool = True) -> tuple[Any, Any]:
    """Tokenizer + prepared data; `report`: write mixture_stats.json and print the resolved mixture."""
    from sft_exp.data.pipeline import prepare_data
    from sft_exp.data.stats import format_table
    from sft_exp.train.model import build_tokenizer

    tokenizer = build_tokenizer(run)
    data = prepare_data(run, tokenizer, cache_dir(run), verbose=report)
    if report:
        write_json(RunDir(run_dir).mixture_stats, data.stats.to_json())
        print("\nresolved mixture\n" + format_table(data.stats) + "\n", flush=True)
    return tokenizer, data


def execute(
    run_dir: Path,
    started: float | None = None,
    *,
    resume_from: Path | None = None,
    prepared: tuple[Any, Any] | None = None,
    report: bool | None = None,
) -> dict[str, Any]:
    """Run the stage the frozen config asks for; returns the metrics (or the mixture stats for mode=prepare).

    Every rank runs this; only rank 0 writes into the run directory. The launcher prepares the data once before the
    ranks start (each rank then reads the tokenised cache) and passes `report=False` to the ranks, or hands its own
    `prepared` data in. `resume_from`: the checkpoint training continues from (sft_exp.launch decides it).
    """
    from sft_exp.ranks import is_main_process

    started = started or time.time()
    run = load_frozen(run_dir)
    if run.mode == Mode.inspect:  # rows with their trained tokens highlighted; nothing is tokenised or trained
        from sft_exp.tools.inspect_view import run_inspect

        return run_inspect(run, run_dir)
    report = is_main_process() if report is None else report
    tokenizer, data = prepared or prepare(run, run_dir, report=report)
    from sft_exp.train import tracking

    tracker = tracking.start(run, run_dir, data.stats.to_json())  # rank 0 only; a no-op for tracking=none
    if run.mode == Mode.prepare:
        tracker.finish()
        return data.stats.to_json()

    from sft_exp.train.loop import run_training
    from sft_exp.train.model import build_model
    from sft_exp.train.sft_config import build_sft_config

    try:
        # The SFTConfig comes before the model: under ZeRO-3, transformers builds the model already partitioned
        # (zero3 init) only while a DeepSpeed-enabled config exists.
        args = build_sft_config(run, str(run_dir))
        model = build_model(run, tokenizer)
        metrics = run_training(
            run, model, tokenizer, data, run_dir, tracker=tracker, args=args, resume_from=resume_from
        )
        del model  # eval.harness reloads the saved model (rank 0; {} when off): sft_exp.eval.harness
        from sft_exp.eval.harness import after_training

        metrics.update(after_training(run, run_dir, tracker, metrics["global_steps"]))
    except BaseException:
        try:
            tracker.finish(exit_code=1)  # the tracked run ends as failed instead of hanging "running"
        except Exception as e:  # noqa: BLE001 - e.g. a full disk again: the error that stopped the run is the one raised
            log.warning("the tracker could not finish: %s", e)
        raise
    metrics["wall_seconds"] = round(time.time() - started, 2)
    if is_main_process():
        write_json(RunDir(run_dir).metrics, metrics)  # written last: its presence marks a finished run
    failed = metrics.get("eval_generate_error") or metrics.get("eval_harness_error")
    tracker.finish(metrics, exit_code=1 if failed else 0)
    from sft_exp.eval.hooks import raise_after_save

    raise_after_save(metrics, run_dir, run)  # a generation / harness eval that failed after training: nothing lost
    return metrics
