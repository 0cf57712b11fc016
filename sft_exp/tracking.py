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

import json
import logging
import time
from pathlib import Path
from typing import Any

from sft_exp.config import RunConfig, TrackingBackend, secret_env_values

log = logging.getLogger("sft_exp")

STATE_FILE = "tracking.json"  # <run_dir>/tracking.json: {"wandb_id": ...} so a resumed run continues the same run

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
    info = _read_json(run_dir / "run_info.json")
    if info:
        flat["git_sha"] = info.get("git_sha")
        flat["overrides"] = info.get("overrides")
    job = _read_json(run_dir / "sweep_job.json")
    if job:
        flat["sweep.dir"] = job.get("sweep_dir")
        flat["sweep.job_num"] = job.get("job_num")
        flat["sweep.swept"] = sorted(job.get("swept", {}))
    if stats:
        flat.update(resolved_mixture(stats))
    return redact(flat)


def resolved_mixture(stats: dict[str, Any]) -> dict[str, Any]:
    """mixture.share.<source> (share of trained tokens), rows and epochs per source, packing efficiency."""
    sources = stats.get("sources", {})
    trained = sum(s.get("trained_tokens", 0) for s in sources.values()) or 1
    out: dict[str, Any] = {}
    for name, s in sources.items():
        out[f"mixture.share.{name}"] = round(s.get("trained_tokens", 0) / trained, 6)
        out[f"mixture.rows.{name}"] = s.get("rows")
        out[f"mixture.epochs.{name}"] = s.get("epochs")
    if "packing" in stats:
        out["packing.efficiency"] = stats["packing"].get("efficiency")
        out["packing.rows"] = stats["packing"].get("bins")
    return out


MIXTURE_COLUMNS = ["source", "weight", "share", "rows", "epochs", "tokens", "trained_tokens", "think_share"]
MIXTURE_COLUMNS += ["mean_length", "p95_length", "max_length", "rows_heldout"]


def mixture_rows(stats: dict[str, Any]) -> list[list[Any]]:
    shares = resolved_mixture(stats)
    rows = []
    for name, s in stats.get("sources", {}).items():
        row = {**s, "source": name, "share": shares.get(f"mixture.share.{name}")}
        rows.append([row.get(c) for c in MIXTURE_COLUMNS])
    return rows


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


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
    return out


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

    def finish(self, metrics: dict[str, Any] | None = None, exit_code: int = 0) -> None: ...


class WandbTracker(Tracker):
    backend = "wandb"

    def __init__(self, run: RunConfig, run_dir: Path, stats: dict[str, Any] | None) -> None:
        import wandb

        t = run.tracking
        state = _read_json(run_dir / STATE_FILE) or {}
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
        from sft_exp.rundir import write_json

        write_json(
            run_dir / STATE_FILE, {"backend": "wandb", "wandb_id": run_id, "project": t.project, "entity": t.entity}
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
        self.swept = set((_read_json(run_dir / "sweep_job.json") or {}).get("swept", {}))
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
    from sft_exp.sweep import is_main_process

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


# ------------------------------------------------------------------------------------------------------ callback
def make_callback(tracker: Tracker, peak: float | None = None, flops_window: dict[str, float] | None = None) -> Any:
    """A transformers TrainerCallback that forwards the trainer's logs, adding tokens/s and (on a GPU) MFU.

    flops_window: filled by the trainer at each training log with "attention_pairs", the sum of s * (s + 1) over the
    sequences all ranks trained on since the previous log (without it, MFU leaves the attention term out)."""
    window = flops_window if flops_window is not None else {}
    from transformers import TrainerCallback

    class TrackingCallback(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = time.perf_counter()
            self.tokens0 = 0.0
            self.n_params = 0
            self.n_layers = self.d_attn = 0
            self.world = 1
            self.mfu: list[float] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            self.t0 = time.perf_counter()
            self.world = max(1, int(getattr(args, "world_size", 1)))
            if model is not None:
                from sft_exp.peft_setup import count_parameters  # ZeRO-3 partitions (numel() 0) counted too

                self.n_params = count_parameters(model)[1]
                cfg = getattr(model, "config", None)
                if cfg is not None and hasattr(cfg, "num_attention_heads"):
                    self.n_layers, self.d_attn = int(cfg.num_hidden_layers), attention_width(cfg)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if not state.is_world_process_zero or not logs:
                return
            metrics = rename(logs)
            is_train = "loss" in logs and not any(k.startswith("eval_") for k in logs)
            if is_train and "num_tokens" in logs:
                now = time.perf_counter()
                tokens = float(logs["num_tokens"])
                if now > self.t0 and tokens > self.tokens0:
                    tps = (tokens - self.tokens0) / (now - self.t0)
                    metrics["train/tokens_per_second"] = round(tps, 1)
                    if peak and self.n_params:
                        # Model FLOPs (train_flops: weights and causal document-masked attention) over the peak of
                        # all the ranks' accelerators.
                        pairs = window.pop("attention_pairs", 0.0)
                        flops = train_flops(self.n_params, self.n_layers, self.d_attn, tokens - self.tokens0, pairs)
                        mfu = flops / (now - self.t0) / self.world / (peak * 1e12)
                        metrics["train/mfu"] = round(mfu, 4)
                        self.mfu.append(mfu)
                self.t0, self.tokens0 = now, tokens
            tracker.log(metrics, state.global_step)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.is_world_process_zero and self.mfu:
                tracker.summary({"final/mfu": round(sum(self.mfu) / len(self.mfu), 4)})

    return TrackingCallback()
