"""Generation eval inside a training run: before training, every N steps, after training (sft_exp.train.loop).

    GenerationInRun.create(run, tokenizer, run_dir, tracker, resume_from)   None when eval.generate.enabled=false
    .evaluate(model, step, label)     every rank generates (sharded models need all ranks); rank 0 writes and logs
    .callback()                       the TrainerCallback of eval.generate.when=steps (None for when=end)
    .end(model, step)                 the metrics.json entries; never raises (see below)

What a run writes: `<run dir>/eval_generate.json` after every evaluation (the latest results, plus `history`: the
before-training and every-N-steps evaluations, each with its step and metrics block); in metrics.json the blocks
`eval_generate` (after training) and `eval_generate_before`; in the tracker `gen/<source or all>/<metric>` scalars
at the evaluation's step and a table of samples; in trainer_state.json's log history the same scalars (every-N-steps
evaluations only: the Trainer's state is saved before the final evaluation).

Failures: a scorer that fails before training stops the run before the first step (nothing is lost yet, and the same
scorer would fail at the end). During training it is a warning. After training, whatever fails (a scorer, or the
generation itself) is caught: the trained model is already saved, metrics.json is written with
`eval_generate_error`, and only then does sft_exp.run.execute raise it (`raise_after_save`), naming the scorer.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from sft_exp.eval.generate import (
    RESULTS_FILE,
    GenerationEval,
    format_table,
    history_entry,
    log_scalars,
    metrics_block,
    raise_first_error,
    write_results,
)
from sft_exp.eval.scorers import GenerationError
from sft_exp.io import read_json
from sft_exp.ranks import is_main_process


class GenerationInRun:
    """A run's generation eval: its prompts (built once, before training) and where results go."""

    def __init__(self, gen: GenerationEval, run: Any, tokenizer: Any, run_dir: Path, tracker: Any) -> None:
        self.gen, self.run, self.tokenizer, self.tracker = gen, run, tokenizer, tracker
        self.path = Path(run_dir) / RESULTS_FILE
        self.history: list[dict[str, Any]] = []
        self.before: dict[str, Any] | None = None

    @classmethod
    def create(
        cls, run: Any, tokenizer: Any, run_dir: Path, tracker: Any = None, resume_from: Path | None = None
    ) -> GenerationInRun | None:
        """The run's generation eval, or None when eval.generate.enabled is false.

        Builds every prompt now, so that a source without held-out rows, or with fewer than `eval.generate.rows`,
        stops the run before training (ConfigError). A resumed run keeps the history of eval_generate.json up to the
        checkpoint it resumes from (the before-training results included)."""
        if not run.eval.generate.enabled:
            return None
        self = cls(GenerationEval.from_run(run, tokenizer), run, tokenizer, Path(run_dir), tracker)
        if resume_from is not None:
            old = read_json(self.path) or {}
            step = _checkpoint_step(resume_from)
            self.history = [h for h in old.get("history", []) if (h.get("step") or 0) <= step]
            self.before = next((h["metrics"] for h in self.history if h.get("label") == "before"), None)
        return self

    def evaluate(self, model: Any, step: int, label: str) -> dict[str, Any]:
        """Generate and score with `model` at `step`; rank 0 writes eval_generate.json, prints the table and logs.

        Args:
            model: the model being trained (the trainer's model: unwrapped from DDP; peft models as they are).
            step: the optimizer step.
            label: 'before', 'step' or 'end'.
        """
        results = self.gen.run(model, self.tokenizer, step=step, label=label)
        if label == "before":
            self.before = metrics_block(results)
        if is_main_process():
            if label != "end":
                self.history.append(history_entry(results))
            write_results(self.path, results, self.history)
            print(format_table(results), flush=True)
            for error in results["errors"] if label == "step" else []:  # before / end: raised by the caller
                print(f"warning: {error}", file=sys.stderr, flush=True)
            if self.tracker is not None:
                self.tracker.log(log_scalars(results), step)
                log_samples = getattr(self.tracker, "log_generations", None)
                if log_samples is not None:
                    log_samples(results, step)
        return results

    def before_training(self, model: Any) -> None:
        """eval_before_train: evaluate at step 0; a failing scorer stops the run here, before the first step."""
        raise_first_error(self.evaluate(model, 0, "before"))

    def callback(self) -> TrainerCallback | None:
        """eval.generate.when=steps: a callback evaluating every `every_steps` optimizer steps (the last step is left
        to the evaluation after training). None for when=end."""
        g = self.run.eval.generate
        if str(getattr(g.when, "value", g.when)) != "steps":
            return None
        return _EveryNSteps(self, int(g.every_steps))

    def end(self, model: Any, step: int) -> dict[str, Any]:
        """Evaluate after training (the model is already saved) and return the metrics.json entries:
        `eval_generate` (source -> metric -> value, and all), `eval_generate_before`, `eval_generate_seconds`, and
        `eval_generate_error` (None, or what failed: a scorer, naming it, or the generation itself). Never raises."""
        out: dict[str, Any] = {"eval_generate_before": self.before}
        try:
            results = self.evaluate(model, step, "end")
        except Exception as e:  # noqa: BLE001 - the run is saved; the failure is reported after metrics.json
            first = str(e).splitlines()[0][:300] if str(e) else ""
            out.update(
                eval_generate=None,
                eval_generate_error=f"eval.generate: generation after training failed: {type(e).__name__}: {first}",
            )
            return out
        out.update(
            eval_generate=metrics_block(results),
            eval_generate_seconds=results["seconds"],
            eval_generate_error=results["errors"][0] if results["errors"] else None,
        )
        return out


def raise_after_save(metrics: dict[str, Any], run_dir: Path, run: Any) -> None:
    """After metrics.json is written: the failure of the generation eval after training, if any, as an error that
    says the trained model and metrics are kept and how to evaluate again."""
    error = metrics.get("eval_generate_error")
    if error:
        raise GenerationError(
            f"{error}. The trained model and metrics.json are kept in {run_dir}; fix the scorer and evaluate again "
            f"with: python -m sft_exp.evaluate {run_dir}"
        )
    error = metrics.get("eval_harness_error")
    if error:
        from sft_exp.eval.harness import HarnessError

        tasks = ",".join(run.eval.harness.tasks)
        raise HarnessError(
            f"{error}. The trained model and metrics.json are kept in {run_dir}; fix the task and evaluate again "
            f"with: python -m sft_exp.evaluate {run_dir} --harness {tasks}"
        )


def _checkpoint_step(path: Path) -> int:
    name = Path(path).name
    return int(name.rsplit("-", 1)[1]) if name.startswith("checkpoint-") and name.rsplit("-", 1)[1].isdigit() else 0


class _EveryNSteps(TrainerCallback):
    """eval.generate.when=steps: generation eval every N optimizer steps, on every rank, RNG-neutral."""

    def __init__(self, owner: GenerationInRun, every: int) -> None:
        self.owner, self.every = owner, every

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        step = state.global_step
        if model is None or step % self.every or (state.max_steps and step >= state.max_steps):
            return
        import torch

        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):  # training draws the same numbers with or without this eval
            results = self.owner.evaluate(model, step, "step")
        state.log_history.append({**log_scalars(results), "step": step})
