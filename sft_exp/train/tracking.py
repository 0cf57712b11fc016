"""Experiment tracking (tracking=none|wandb|tensorboard): one Tracker per run, fed by a TrainerCallback.

We drive W&B and TensorBoard ourselves instead of transformers' report_to integrations, so that the run is named
after its overrides, grouped by its sweep, carries the *resolved* config flattened (each mixture weight its own key,
plus the resolved shares), logs the per-source losses under stable names, and resumes the same W&B run id after a
restart or a Slurm requeue (the id lives in <run_dir>/tracking.json).

Secrets: nothing here reads an API key. W&B finds WANDB_API_KEY in the environment (or ~/.netrc) by itself;
`config.validate` refuses a config holding the value of a secret environment variable, and `flat_config` redacts one
again before anything is sent, so a key can reach neither run_config.yaml nor the tracker's config.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sft_exp.config import RunConfig, TrackingBackend, secret_env_values
from sft_exp.data.stats import MIXTURE_COLUMNS, mixture_rows, resolved_mixture
from sft_exp.io import read_json
from sft_exp.rundir import RunDir

log = logging.getLogger("sft_exp")


# Peak dense bf16 TFLOP/s per GPU (no sparsity), for MFU; matched against torch.cuda.get_device_name().
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIE": 756.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "L4": 121.0,
}


# ------------------------------------------------------------------------------------------------------ config
def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values (W&B shows them as such)."""
    out: dict[str, Any] = {}
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and v:
                out.update(flatten(v, key))
            else:
                out[key] = v
    else:
        out[prefix] = node
    return out


def redact(flat: dict[str, Any]) -> dict[str, Any]:
    secrets = secret_env_values()

    def clean(v: Any) -> Any:
        if isinstance(v, str):
            for value, name in secrets.items():
                v = v.replace(value, f"<${name}>")
        elif isinstance(v, list):
            v = [clean(x) for x in v]
        return v

    return {k: clean(v) for k, v in flat.items()}


def flat_config(run: RunConfig, run_dir: Path, stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resolved config, one key per leaf (mixture.sources.arith.weight), plus what the run resolved it to."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.structured(run), enum_to_str=True)
    flat = flatten(cfg)
    flat["run_dir"] = str(run_dir)
    info = read_json(RunDir(run_dir).info)
    if info:
        flat["git_sha"] = info.get("git_sha")
        flat["overrides"] = info.get("overrides")
    job = read_json(RunDir(run_dir).sweep_job)
    if job:
        flat["sweep.dir"] = job.get("sweep_dir")
        flat["sweep.job_num"] = job.get("job_num")
        flat["sweep.swept"] = sorted(job.get("swept", {}))
    if stats:
        flat.update(resolved_mixture(stats))
    return redact(flat)


# Per-source eval timings the Trainer logs for every eval set: clutter in a tracker, dropped.
EVAL_NOISE = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time", "_num_tokens")


def rename(logs: dict[str, Any]) -> dict[str, Any]:
    """Trainer log keys -> tracker keys: eval_arith_loss -> eval/arith_loss, loss_arith -> train/loss_arith."""
    out = {}
    for k, v in logs.items():
        if not isinstance(v, (int, float)) or (k.startswith("eval_") and k.endswith(EVAL_NOISE)):
            continue
        if k.startswith("eval_"):
            out[f"eval/{k.removeprefix('eval_')}"] = v
        else:
            out[f"train/{k}"] = v
    return out


def final_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics.json -> summary keys: final/eval_loss/<source>, final/train_loss/<source>, final/tokens_per_second."""
    out: dict[str, Any] = {}
    for key, name in (
        ("eval_loss_after", "eval_loss"),
        ("eval_loss_before", "eval_loss_before"),
        ("train_loss_last", "train_loss"),
        ("eval_trained_tokens", "eval_trained_tokens"),
    ):
        for src, v in (metrics.get(key) or {}).items():
            out[f"final/{name}/{src}"] = v
    for key in ("train_tokens_per_second", "wall_seconds", "global_steps", "train_runtime_seconds", "mfu"):
        if key in metrics:
            out[f"final/{key.removeprefix('train_')}"] = metrics[key]
    if "packing_efficiency" in metrics:
        out["packing/efficiency"] = metrics["packing_efficiency"]
    # eval.generate: final/gen/<source or all>/<metric>[/<mode>] after training, final/gen_before/... before it
    for key, name in (("eval_generate", "gen"), ("eval_generate_before", "gen_before")):
        for src, values in (metrics.get(key) or {}).items():
            for metric, v in values.items():
                out[f"final/{name}/{src}/{metric}"] = v
    for task, values in (metrics.get("eval_harness") or {}).items():  # eval.harness: final/harness/<task>/<metric>
        for metric, v in values.items():
            out[f"final/harness/{task}/{metric}"] = v
    return out


GENERATION_COLUMNS = ["label", "step", "source", "row", "turn", "mode", "prompt", "reference", "generation"]
GENERATION_COLUMNS += ["stopped", "score", "think_ok"]


def generation_rows(results: dict[str, Any]) -> list[list[Any]]:
    """The samples of a generation eval (sft_exp.eval.generate) as table rows; the prompt is its last message."""
    rows = []
    for name, src in results.get("sources", {}).items():
        for s in src.get("samples", []):
            last = s["prompt"][-1]["content"] if s["prompt"] else ""
            rows.append(
                [results.get("label"), results.get("step"), name, s["row"], s["turn"], s["mode"], last]
                + [s["reference"], s["generation"], s["stopped"], s["scores"].get("score"), s["scores"]["think_ok"]]
            )
    return rows


def peak_tflops(configured: float | None) -> float | None:
    if configured:
        return configured
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name().upper()
    except Exception:  # noqa: BLE001 - no GPU, no MFU
        return None
    for key, tf in PEAK_TFLOPS.items():
        if key.upper() in name:
            return tf
    return None


def new_run_id() -> str:
    """A W&B-style run id: 8 characters of [a-z0-9]."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


# ------------------------------------------------------------------------------------------------------ trackers
class Tracker:
    """No tracking (tracking=none, or a rank other than 0)."""

    backend = "none"

    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def log_mixture(self, stats: dict[str, Any]) -> None: ...

    def summary(self, values: dict[str, Any]) -> None: ...

    def log_generations(self, results: dict[str, Any], step: int) -> None:
        """The samples of a generation eval (prompt, reference, generation, scores) as a table."""

    def finish(self, metrics: dict[str, Any] | None = None, exit_code: int = 0) -> None: ...


class WandbTracker(Tracker):
    backend = "wandb"

    def __init__(self, run: RunConfig, run_dir: Path, stats: dict[str, Any] | None) -> None:
        import wandb

        t = run.tracking
        state = read_json(RunDir(run_dir).tracking_state) or {}
        run_id = state.get("wandb_id") or new_run_id()
        resumed = "wandb_id" in state
        tags = list(t.tags)
        if run.experiment:
            tags.append(f"experiment:{run.experiment}")
        self.wandb = wandb
        self.run = wandb.init(
            project=t.project,
            entity=t.entity,
            mode=t.mode.value,
            name=t.name,
            group=t.group,
            job_type=t.job_type or run.mode.value,
            tags=tags,
            notes=t.notes,
            dir=str(run_dir),
            id=run_id,
            # "allow": continue the run with this id if it exists (resume, requeue), else create it.
            resume="allow",
            config=flat_config(run, run_dir, stats),
            settings=wandb.Settings(silent=True),
        )
        # Every metric is plotted against the optimizer step, whatever order the logs arrive in.
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)
        from sft_exp.io import write_json

        write_json(
            RunDir(run_dir).tracking_state,
            {"backend": "wandb", "wandb_id": run_id, "project": t.project, "entity": t.entity},
        )
        log.info("W&B run %s (%s, %s%s)", run_id, t.mode.value, t.name, ", resumed" if resumed else "")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({**metrics, "train/global_step": step})

    def log_mixture(self, stats: dict[str, Any]) -> None:
        table = self.wandb.Table(columns=MIXTURE_COLUMNS, data=mixture_rows(stats))
        self.run.log({"mixture": table, "train/global_step": 0})
        self.run.config.update(resolved_mixture(stats), allow_val_change=True)
        if "packing" in stats:
            self.run.summary["packing/efficiency"] = stats["packing"].get("efficiency")

    def summary(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            self.run.summary[k] = v

    def log_generations(self, results: dict[str, Any], step: int) -> None:
        table = self.wandb.Table(columns=GENERATION_COLUMNS, data=generation_rows(results))
        self.run.log({f"gen/samples_{results.get('label')}": table, "train/global_step": step})

    def finish(self, metrics: dict[str, Any] | None = None, exit_code: int = 0) -> None:
        if metrics:
            self.summary(final_summary(metrics))
        self.run.finish(exit_code=exit_code)


class TensorBoardTracker(Tracker):
    backend = "tensorboard"

    def __init__(self, run: RunConfig, run_dir: Path, stats: dict[str, Any] | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.dir))
        self.config = flat_config(run, run_dir, stats)
        self.swept = set((read_json(RunDir(run_dir).sweep_job) or {}).get("swept", {}))
        self.final: dict[str, float] = {}
        rows = "\n".join(f"| {k} | {v} |" for k, v in self.config.items())
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + rows, 0)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def log_mixture(self, stats: dict[str, Any]) -> None:
        head = "| " + " | ".join(MIXTURE_COLUMNS) + " |\n|" + "---|" * len(MIXTURE_COLUMNS) + "\n"
        body = "\n".join("| " + " | ".join(str(x) for x in r) + " |" for r in mixture_rows(stats))
        self.writer.add_text("mixture", head + body, 0)
        if "packing" in stats:
            self.writer.add_scalar("packing/efficiency", stats["packing"].get("efficiency", 0.0), 0)

    def log_generations(self, results: dict[str, Any], step: int) -> None:
        def cell(x: Any) -> str:
            return str(x).replace("|", "\\|").replace("\n", "<br>")

        head = "| " + " | ".join(GENERATION_COLUMNS) + " |\n|" + "---|" * len(GENERATION_COLUMNS) + "\n"
        body = "\n".join("| " + " | ".join(cell(x) for x in r) + " |" for r in generation_rows(results))
        self.writer.add_text("gen/samples", head + body, step)

    def summary(self, values: dict[str, Any]) -> None:
        self.final.update({k: v for k, v in values.items() if isinstance(v, (int, float))})

    def finish(self, metrics: dict[str, Any] | None = None, exit_code: int = 0) -> None:
        if metrics:
            final = {**self.final, **{k: v for k, v in final_summary(metrics).items() if isinstance(v, (int, float))}}
            # The HPARAMS tab: scalar config values (swept ones first) against the final losses.
            hp = {k: v for k, v in self.config.items() if isinstance(v, (int, float, str, bool)) and v is not None}
            hp = {**{k: hp[k] for k in self.swept if k in hp}, **hp}
            self.writer.add_hparams(hp, final, run_name=".")
        self.writer.close()


def start(run: RunConfig, run_dir: Path, stats: dict[str, Any] | None = None) -> Tracker:
    """The run's tracker (rank 0 only; every other rank gets the no-op Tracker)."""
    from sft_exp.ranks import is_main_process

    backend = run.tracking.backend
    if backend == TrackingBackend.none or not is_main_process():
        return Tracker()
    tracker: Tracker = (WandbTracker if backend == TrackingBackend.wandb else TensorBoardTracker)(run, run_dir, stats)
    if stats:
        tracker.log_mixture(stats)
    return tracker


# ------------------------------------------------------------------------------------------------------ FLOPs
def attention_width(config: Any) -> int:
    """n_heads x head_dim: the width the attention scores and values are computed at."""
    heads = int(config.num_attention_heads)
    return heads * int(getattr(config, "head_dim", None) or config.hidden_size // heads)


def train_flops(n_params: int, n_layers: int, d_attn: int, tokens: float, attention_pairs: float) -> float:
    """Training FLOPs (forward + backward) of a causal LM over document-masked sequences:
    6 * N * tokens (every weight: 2 FLOPs per token forward, 4 backward) + 6 * n_layers * d_attn * sum s * (s + 1)
    (QK^T and AV over the s (s + 1) / 2 causal pairs of each sequence, 2 x 2 FLOPs each, times 3 for the backward);
    attention_pairs is that sum over the sequences. The formula of bench/gpu_throughput.py."""
    return 6.0 * n_params * tokens + 6.0 * n_layers * d_attn * attention_pairs
