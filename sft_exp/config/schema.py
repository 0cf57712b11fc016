"""The typed schema under the YAML: one dataclass per config group, registered in Hydra's ConfigStore.

Hydra merges `conf/**.yaml` into these dataclasses, so an unknown key, a wrong type or an invalid enum value fails
at composition, naming the key. Cross-field checks that a type cannot express live in `validate()` methods and run
before any model or data is touched. This module imports nothing heavy (no torch, no transformers), so `--cfg`,
`--help` and composition errors stay fast.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from sft_exp.errors import ConfigError

ASSETS = Path(__file__).resolve().parents[1] / "assets"


# --------------------------------------------------------------------------------------------------------- choices
class Mode(str, Enum):
    train = "train"
    prepare = "prepare"
    inspect = "inspect"  # print rendered rows with the trained tokens highlighted; writes inspect.html


class ModelInit(str, Enum):
    pretrained = "pretrained"  # from_pretrained(name_or_path): the real path for hub ids and local folders
    random = "random"  # from_config(AutoConfig.from_pretrained(name_or_path)): smoke tests without weights


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class AttnImpl(str, Enum):
    sdpa = "sdpa"
    eager = "eager"
    flex_attention = "flex_attention"
    flash_attention_2 = "flash_attention_2"
    flash_attention_3 = "flash_attention_3"
    flash_attention_4 = "flash_attention_4"
    varlen = (
        "varlen"  # PyTorch's own FlashAttention varlen kernel (sft_exp/train/attention.py); CUDA, no flash-attn needed
    )


class Weighting(str, Enum):
    fraction = "fraction"  # keep floor(w x rows) rows of a source; w > 1 upsamples, w = 0 drops it
    proportion = "proportion"  # weights normalised into shares of mixture.total_rows or mixture.total_tokens


class BadRows(str, Enum):
    error = "error"
    drop = "drop"


class PackingStrategy(str, Enum):
    ffd = "ffd"  # ours: first-fit-decreasing over the whole training set at once
    bfd = "bfd"  # global best-fit-decreasing (TRL's name; ours runs over the whole set, not 1000-row chunks)
    # TRL's bfd_split is not a strategy here: it is bfd + overflow=split (the packing=bfd_split preset).
    wrapped = "wrapped"  # concatenate and cut every max_length tokens (sequences straddle rows)
    none = "none"  # one sequence per row: no packing


class Overflow(str, Enum):
    truncate = "truncate"
    split = "split"
    drop = "drop"


class TrainOn(str, Enum):
    """Which template tokens of an assistant turn carry loss (besides the turn's content, always trained)."""

    content = "content"  # the assistant content + its end-of-turn token
    # ... plus the turn's header ("<|im_start|>assistant\n") and the empty no_think block the template writes
    content_and_header = "content_and_header"
    # exactly what the template's {% generation %} markers wrap (TRL's assistant_only_loss): the SmolLM3 recipe's
    template = "template"


class DataFormat(str, Enum):
    """How a source's rows are laid out (sft_exp/data/formats.py); auto detects it from the columns."""

    auto = "auto"
    messages = "messages"
    sharegpt = "sharegpt"
    alpaca = "alpaca"
    prompt_completion = "prompt_completion"


class DistStrategy(str, Enum):
    single = "single"  # one process, no process group
    ddp = "ddp"  # torch DistributedDataParallel (gloo on CPUs, nccl on GPUs)
    fsdp = "fsdp"  # FSDP2 (torch fully_shard) through accelerate; on GPUs, and on CPU ranks over gloo
    zero2 = "zero2"  # DeepSpeed ZeRO stage 2
    zero3 = "zero3"  # DeepSpeed ZeRO stage 3 (the recipe's: zero3 init, 16-bit model save)
    zero3_offload = "zero3_offload"  # ZeRO-3 with parameters and optimizer state offloaded to CPU memory


class DistBackend(str, Enum):
    auto = "auto"  # nccl when CUDA is available, else gloo
    gloo = "gloo"
    nccl = "nccl"


class TrackingBackend(str, Enum):
    none = "none"
    wandb = "wandb"
    tensorboard = "tensorboard"


class WandbMode(str, Enum):
    online = "online"
    offline = "offline"  # writes <run_dir>/wandb/offline-run-*; `wandb sync` uploads it later
    disabled = "disabled"


class PeftMethod(str, Enum):
    none = "none"  # full fine-tuning: every weight trains (the recipe)
    lora = "lora"  # low-rank adapters on a frozen base (peft.LoraConfig)
    qlora = "qlora"  # LoRA on a 4-bit (bitsandbytes) base; CUDA GPUs only


class QuantType(str, Enum):
    nf4 = "nf4"
    fp4 = "fp4"


# transformers' own enums (transformers.trainer_utils), copied so a typo fails at composition without importing
# transformers here; tests/test_config.py checks they still match the installed version.
class SchedulerType(str, Enum):
    linear = "linear"
    cosine = "cosine"
    cosine_with_restarts = "cosine_with_restarts"
    polynomial = "polynomial"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    inverse_sqrt = "inverse_sqrt"
    reduce_lr_on_plateau = "reduce_lr_on_plateau"
    cosine_with_min_lr = "cosine_with_min_lr"
    cosine_warmup_with_min_lr = "cosine_warmup_with_min_lr"
    warmup_stable_decay = "warmup_stable_decay"
    greedy = "greedy"


class IntervalStrategy(str, Enum):
    no = "no"
    steps = "steps"
    epoch = "epoch"


class SaveStrategy(str, Enum):
    no = "no"
    steps = "steps"
    epoch = "epoch"
    best = "best"


# ------------------------------------------------------------------------------------------------------ the groups
@dataclass
class ModelConfig:
    name_or_path: str = "${asset:tiny_smollm3}"
    revision: str | None = None
    dtype: DType = DType.float32  # float32 on CPUs: bf16 matmuls are ~6x slower there
    attn_implementation: AttnImpl = AttnImpl.sdpa
    trust_remote_code: bool = False  # never run code from a model repo unless the user says so
    init: ModelInit = ModelInit.pretrained


@dataclass
class TemplateConfig:
    # Inline Jinja text, or a path to a .jinja file; null keeps the tokenizer's own template.
    chat_template: str | None = None
    eos_token: str | None = None  # the end-of-turn token that ends generation and carries loss
    enable_thinking: bool = True  # the reasoning mode of rows whose chat_template_kwargs do not say
    # Pinned "Today Date" for templates that write one, so tokens (and cache keys) do not change with the calendar.
    date_string: str | None = None
    # Tokens of an assistant turn that carry loss, whatever the template's {% generation %} markers wrap (see TrainOn).
    train_on: TrainOn = TrainOn.content


@dataclass
class SourceConfig:
    id: str | None = None  # a hub dataset id, read with datasets.load_dataset
    path: str | None = None  # a local .jsonl/.json/.parquet/.arrow file, a folder of them, or a saved dataset
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    columns: list[str] | None = None  # columns kept; default: messages (+ chat_template_kwargs when present)
    weight: float = 1.0  # unit set by mixture.weighting
    # The reasoning mode of this source's rows that carry no chat_template_kwargs.enable_thinking (plain messages
    # data); None: template.enable_thinking. Part of the source's cache key.
    enable_thinking: bool | None = None
    format: DataFormat = DataFormat.auto  # the rows' layout; converted to messages before the template
    fields: dict[str, str] = field(default_factory=dict)  # the data's names: {messages: chat, role: from, ...}
    roles: dict[str, str] = field(default_factory=dict)  # the data's role names -> system/user/assistant/tool
    # How generated turns of this source are scored (eval.generate): exact_match, contains, regex, json_tool_call,
    # none, or a Python function 'package.module:function' (sft_exp/eval/scorers.py says what each does).
    scorer: str = "none"
    scorer_args: dict[str, Any] = field(default_factory=dict)  # e.g. {pattern: '(-?\d+)\.?$'} for scorer=regex


@dataclass
class SourceDefaults:
    """Fields every source of a mixture shares unless it sets its own (applied by to_run_config, so the frozen
    run_config.yaml spells every source out). id/config/revision go to hub sources only (no `path`)."""

    id: str | None = None
    config: str | None = None
    revision: str | None = None
    columns: list[str] | None = None


@dataclass
class MixtureSearchConfig:
    """Random mixtures for sweep=mixture_random (sft_exp/data/mixture.py: draw_shares, apply_mixture_draw): with
    mixture.draw=i the source weights become point i of a seeded Dirichlet(alpha) within per-source share bounds, or
    points[i] when points are given (proposals written by `python -m sft_exp.mixsearch`)."""

    seed: int = 0
    alpha: float = 1.0
    min_share: dict[str, float] = field(default_factory=dict)
    max_share: dict[str, float] = field(default_factory=dict)
    points: list[dict[str, float]] = field(default_factory=list)


@dataclass
class MixtureConfig:
    # New sources come from a mixture YAML (conf/mixture/*.yaml or --config-dir): OmegaConf 2.3 cannot add a new
    # structured value to a typed dict from the command line (`+mixture.sources.x=...` fails).
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    source_defaults: SourceDefaults = field(default_factory=SourceDefaults)
    weighting: Weighting = Weighting.fraction
    # The budget that weighting=proportion shares out: rows, or tokens that carry loss (assistant tokens).
    total_rows: int | None = None
    total_tokens: int | None = None
    seed: int = 0
    # Held-out rows per source, drawn before weighting: < 1 is a fraction of the source, >= 1 a row count.
    test_split_size: float = 0.0
    on_bad_rows: BadRows = BadRows.error
    num_proc: int = 1
    # sweep=mixture_random: the index of the random mixture (or proposal) this run trains; replaces the weights.
    draw: int | None = None
    search: MixtureSearchConfig = field(default_factory=MixtureSearchConfig)
    # Each epoch draws its own rows (fraction < 1: a fresh subset; > 1: repeats spread over epochs), seeded per epoch.
    resample_each_epoch: bool = False


@dataclass
class PackingConfig:
    strategy: PackingStrategy = PackingStrategy.ffd  # packing off: strategy=none (packing=none)
    max_length: int = 1024
    overflow: Overflow = Overflow.truncate


@dataclass
class DistributedConfig:
    strategy: DistStrategy = DistStrategy.single
    nodes: int = 1  # > 1 needs Slurm (launcher=slurm)
    processes_per_node: int = 1  # ranks per node: at most one per GPU (or per CPU core without GPUs)
    backend: DistBackend = DistBackend.auto
    master_port: int = 0  # 0: a free port here; under Slurm, one derived from the job id
    timeout_minutes: int = 30  # collective-operation timeout (the Trainer's ddp_timeout)
    # The DeepSpeed JSON config for the zero* strategies ("auto" values are filled from train.*).
    deepspeed: dict[str, Any] = field(default_factory=dict)
    # transformers' fsdp_config for strategy=fsdp.
    fsdp: dict[str, Any] = field(default_factory=dict)


@dataclass
class LauncherConfig:
    """Where runs execute. launcher=slurm feeds these into hydra/launcher=submitit_slurm (conf/launcher/slurm.yaml)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    timeout_min: int = 60  # the job's time limit
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    mem_gb: int | None = None
    # Times a job that hit its time limit checkpoints and requeues itself (preemptions requeue without limit).
    max_requeues: int = 3
    signal_delay_s: int = 120  # Slurm signals the job this long before its time limit
    setup: list[str] = field(default_factory=list)  # shell lines run before the job (module load, source venv)


@dataclass
class TrainConfig:
    """SFTConfig-level fields. Anything else SFTConfig takes goes in `extra`, checked against its fields."""

    learning_rate: float = 2e-5
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 1
    per_device_eval_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: SchedulerType = SchedulerType.linear
    lr_scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    bf16: bool = False  # TRL defaults this to True; on a CPU it is 6x slower, so we default to False
    gradient_checkpointing: bool = False
    save_strategy: SaveStrategy = SaveStrategy.no
    save_steps: float = 500
    save_total_limit: int | None = None
    logging_steps: float = 10
    eval_strategy: IntervalStrategy = IntervalStrategy.no
    eval_steps: float | None = None
    assistant_only_loss: bool = True
    use_liger_kernel: bool = False
    report_to: list[str] = field(default_factory=lambda: ["none"])
    dataloader_num_workers: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrackingConfig:
    """Experiment tracking (conf/tracking/*.yaml). No API key ever goes here: W&B reads WANDB_API_KEY from the env."""

    backend: TrackingBackend = TrackingBackend.none
    project: str = "sft-exp"
    entity: str | None = None
    mode: WandbMode = WandbMode.online
    name: str | None = None  # null: the run's overrides (only the swept ones in a sweep)
    group: str | None = None  # null: the sweep (its directory) in a multirun; no group for a single run
    job_type: str | None = None  # null: the mode (train / prepare)
    tags: list[str] = field(default_factory=list)
    notes: str | None = None
    # Peak dense TFLOP/s of one accelerator for MFU; null looks the GPU's name up (H100, H200, A100, ...).
    peak_tflops: float | None = None


@dataclass
class SweepConfig:
    # What launch.py returns to the sweeper (Optuna minimises it): the eval loss after training, over every source
    # ("all", trained-token weighted) or one source's name; or a generation metric, gen/<source or all>/<metric>
    # (eval.generate), returned negated when higher is better (sft_exp.eval.scorers.metric_direction).
    objective: str = "all"
    trials: int = 12  # sweep=mixture_random: how many random mixtures


class GenerateWhen(str, Enum):
    end = "end"  # after training (and before it, with eval_before_train)
    steps = "steps"  # also every eval.generate.every_steps optimizer steps


class GenerateTurns(str, Enum):
    all = "all"  # every assistant turn of a held-out row is a prompt (earlier turns from the reference)
    last = "last"  # only the last assistant turn of each row


@dataclass
class GenerateConfig:
    """Generation-based evaluation on the held-out rows (sft_exp/eval/generate.py): the model writes each held-out
    assistant turn, scored by its source's scorer and for mode compliance (stops, think_ok, role_leak, length)."""

    enabled: bool = False
    rows: int = 32  # held-out rows per source to generate for (the first ones); at most the held-out set
    max_new_tokens: int = 128  # per turn, the end-of-turn token included
    when: GenerateWhen = GenerateWhen.end
    every_steps: int = 0  # when=steps: evaluate every this many optimizer steps (and at the end)
    batch_size: int = 64  # prompts per generate call (sorted by length first)
    turns: GenerateTurns = GenerateTurns.all
    samples: int = 3  # rows per source whose prompt, reference and generation go into eval_generate.json


@dataclass
class HarnessConfig:
    """Benchmarks through EleutherAI's lm-evaluation-harness on the final model, after training, in the same job
    (sft_exp/eval/harness.py; pip install 'sft-exp[harness]'). Scores: <run_dir>/eval_harness.json, metrics.json's
    `eval_harness` block (task -> metric -> value), the tracker, the sweep index, compare, sweep.objective."""

    # lm-eval task, group or tag names; [] (the default) runs nothing. e.g. [sftexp_demo] (shipped, offline),
    # [hellaswag,arc_easy] (hub datasets: on an offline cluster, pre-download them or define local tasks).
    tasks: list[str] = field(default_factory=list)
    # Folders of local task YAMLs (dataset_path: json + data_files: the way offline clusters run it), searched
    # before lm-eval's own tasks. The shipped demo tasks (sft_exp/assets/harness) are always included.
    include_path: list[str] = field(default_factory=list)
    limit: float | None = None  # examples per task (>= 1), or a share of each task (< 1); null: every example
    num_fewshot: int | None = None  # null: each task's own default
    batch_size: int = 16
    # Prompts through the run's chat template, as the model was trained: what an SFT model is scored on. false:
    # raw text, how base-model leaderboards score (and what most published few-shot numbers assume).
    apply_chat_template: bool = True
    # The template's reasoning mode for harness prompts: null keeps the template's default (SmolLM3: think).
    enable_thinking: bool | None = None
    # A reply is scored on what follows this marker (the thinking is cut off); null scores the whole reply.
    think_end_token: str | None = "</think>"
    gen_kwargs: dict[str, Any] = field(default_factory=dict)  # generate_until tasks, e.g. {max_gen_toks: 256}
    samples: int = 3  # examples per task whose prompt, target and reply go into eval_harness.json
    # Load every task (its dataset included) before training, so a dataset missing on an offline machine fails in
    # seconds, not after the run; costs loading them twice (seconds for most tasks, more for large groups).
    check_data: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # any other lm_eval.simple_evaluate argument


@dataclass
class EvalConfig:
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    harness: HarnessConfig = field(default_factory=HarnessConfig)


@dataclass
class InspectConfig:
    """mode=inspect: rows shown with their trained tokens highlighted (terminal + <run_dir>/inspect.html)."""

    n: int = 3  # rows per source, the first n of each
    source: str | None = None  # one source of the mixture; null shows every source


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning (conf/peft/*.yaml), built into a peft.LoraConfig by sft_exp.train.peft."""

    method: PeftMethod = PeftMethod.none
    r: int = 16  # LoRA rank
    alpha: int = 32  # LoRA scaling numerator: the update is (alpha / r) * B @ A
    dropout: float = 0.05
    # null: a default per architecture (llama-like: q/k/v/o/gate/up/down projections; others: every linear layer
    # but the LM head, i.e. [all-linear]). Or module-name suffixes, e.g. [q_proj, v_proj].
    target_modules: list[str] | None = None
    # Modules trained fully and saved beside the adapter, e.g. [embed_tokens] after adding tokens.
    modules_to_save: list[str] | None = None
    # Also write <run_dir>/merged/: the base with the adapter folded in, loadable with plain AutoModelForCausalLM.
    merge: bool = False
    quant_type: QuantType = QuantType.nf4  # qlora: the 4-bit data type
    double_quant: bool = True  # qlora: quantise the quantisation constants too (~0.4 bit/parameter saved)
    extra: dict[str, Any] = field(default_factory=dict)  # any other peft.LoraConfig field (use_rslora, use_dora, ...)


@dataclass
class PathsConfig:
    """Where outputs go (conf/paths/default.yaml). A relative path is relative to where launch.py starts."""

    output_dir: str = "outputs"  # runs/ and sweeps/ (hydra.run.dir, hydra.sweep.dir); the cache defaults to cache/


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mode: Mode = Mode.train
    paths: PathsConfig = field(default_factory=PathsConfig)
    # Where tokenised sources are cached (shared by every run of a sweep): conf/config.yaml sets
    # ${paths.output_dir}/cache, made absolute when resolved. null (frozen before conf/paths existed): outputs/cache.
    cache_dir: str | None = None
    # Evaluate every source before training so metrics.json can show how much each eval loss dropped.
    eval_before_train: bool = True
    # The experiment preset chosen, if any (set by conf/experiment/*.yaml; informational).
    experiment: str | None = None
    # false: a new run directory. true: continue the latest run made with the same overrides (same command).
    # <run dir>: continue that run. Either way training goes on from its last complete checkpoint.
    resume: Any = False
    # <run dir>: run again with that run's config (its run_config.yaml; where and how to run, paths, mode, tracking,
    # stay this command's) and the model and hub sources pinned to the commit SHAs of its lock.json (sft_exp/lock.py).
    lock: str | None = None
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    inspect: InspectConfig = field(default_factory=InspectConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ------------------------------------------------------------------------------------------------------ validation
def _fail(where: str, what: str, fix: str) -> None:
    raise ConfigError(f"{where}: {what}. {fix}")


# train.<key>: (the values transformers can use, as a test on the value, the fix). Checked before anything is written:
# transformers would take most of these silently and fail (or divide by zero) inside the training loop.
_TRAIN_RANGES: dict[str, tuple[str, Any, str]] = {
    "learning_rate": ("a number > 0", lambda v: math.isfinite(v) and v > 0, "e.g. train.learning_rate=1e-5"),
    "num_train_epochs": ("a number > 0", lambda v: math.isfinite(v) and v > 0, "e.g. train.num_train_epochs=2"),
    "max_steps": ("-1 (train num_train_epochs) or >= 1", lambda v: v == -1 or v >= 1, "e.g. train.max_steps=-1"),
    "per_device_train_batch_size": ("an integer >= 1", lambda v: v >= 1, "e.g. train.per_device_train_batch_size=1"),
    "per_device_eval_batch_size": ("an integer >= 1", lambda v: v >= 1, "e.g. train.per_device_eval_batch_size=1"),
    "gradient_accumulation_steps": ("an integer >= 1", lambda v: v >= 1, "e.g. train.gradient_accumulation_steps=8"),
    "warmup_ratio": ("a share of the steps in [0, 1)", lambda v: 0 <= v < 1, "e.g. train.warmup_ratio=0.03"),
    "weight_decay": ("a number >= 0", lambda v: v >= 0, "e.g. train.weight_decay=0.0"),
    "max_grad_norm": ("a number >= 0 (0: no clipping)", lambda v: v >= 0, "e.g. train.max_grad_norm=1.0"),
    "seed": ("an integer >= 0", lambda v: v >= 0, "e.g. train.seed=42"),
    "logging_steps": ("> 0 (steps, or a share of them when < 1)", lambda v: v > 0, "e.g. train.logging_steps=10"),
    "save_steps": ("> 0 (steps, or a share of them when < 1)", lambda v: v > 0, "e.g. train.save_steps=500"),
    "dataloader_num_workers": ("an integer >= 0", lambda v: v >= 0, "e.g. train.dataloader_num_workers=0"),
}


def validate_train_values(t: TrainConfig) -> None:
    """Every train.* value in the range the Trainer can use, checked the way it would (before anything is written)."""
    for key, (what, ok, fix) in _TRAIN_RANGES.items():
        value = getattr(t, key)
        if not ok(value):
            _fail(f"train.{key}", f"must be {what}, got {value}", fix)
    if t.eval_steps is not None and not t.eval_steps > 0:
        _fail("train.eval_steps", f"must be > 0, got {t.eval_steps}", "e.g. train.eval_steps=50")
    if t.save_total_limit is not None and t.save_total_limit < 1:
        _fail("train.save_total_limit", f"must be >= 1 or null, got {t.save_total_limit}", "null keeps every one")


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that the schema's types cannot express. Cheap: no model or data is loaded."""
    validate_tracking_and_sweep(cfg)
    validate_train_values(cfg.train)
    m = cfg.mixture
    if not m.sources:
        _fail("mixture.sources", "no sources", "Choose a mixture (mixture=demo) or add mixture.sources.<name>.path=...")
    for name, s in m.sources.items():
        key = f"mixture.sources.{name}"
        if (s.id is None) == (s.path is None):
            _fail(key, "needs exactly one of `id` (hub dataset) or `path` (local data)", f"Set {key}.id or {key}.path")
        if s.weight is None or math.isnan(s.weight) or s.weight < 0:
            _fail(f"{key}.weight", f"must be a number >= 0, got {s.weight}", "Use 0 to drop a source, 1 to keep it")
        if s.path is not None and not os.path.exists(s.path):
            _fail(
                f"{key}.path", f"'{s.path}' does not exist", "Point it at a .jsonl/.json/.parquet/.arrow file or folder"
            )
    if all(s.weight == 0 for s in m.sources.values()):
        _fail("mixture.sources.*.weight", "every weight is 0, nothing would be trained", "Give one source a weight > 0")
    if m.weighting == Weighting.proportion and (m.total_rows is None) == (m.total_tokens is None):
        _fail(
            "mixture.weighting",
            "'proportion' shares out a budget: set exactly one of mixture.total_rows or mixture.total_tokens",
            "e.g. mixture.total_rows=10000",
        )
    if m.weighting == Weighting.fraction and (m.total_rows is not None or m.total_tokens is not None):
        _fail(
            "mixture.total_rows/total_tokens",
            "only apply to mixture.weighting=proportion",
            "Set mixture.weighting=proportion, or drop the budget",
        )
    for budget in ("total_rows", "total_tokens"):
        if getattr(m, budget) is not None and getattr(m, budget) <= 0:
            _fail(f"mixture.{budget}", f"must be > 0, got {getattr(m, budget)}", "")
    if m.test_split_size < 0 or math.isnan(m.test_split_size):
        _fail("mixture.test_split_size", f"must be >= 0, got {m.test_split_size}", "Use a fraction < 1 or a count")
    if m.test_split_size >= 1 and m.test_split_size != int(m.test_split_size):
        _fail("mixture.test_split_size", f"{m.test_split_size} is neither a fraction < 1 nor a whole count", "")
    if m.num_proc < 1:
        _fail("mixture.num_proc", f"must be >= 1, got {m.num_proc}", "")
    if cfg.inspect.n < 1:
        _fail("inspect.n", f"must be >= 1, got {cfg.inspect.n}", "Show at least one row, e.g. inspect.n=3")
    if cfg.inspect.source is not None and cfg.inspect.source not in m.sources:
        _fail(
            "inspect.source",
            f"'{cfg.inspect.source}' is not a source of the mixture",
            f"Use one of {sorted(m.sources)}",
        )

    p = cfg.packing
    if p.max_length < 16:
        _fail("packing.max_length", f"{p.max_length} is too small to hold a chat turn", "Use at least a few hundred")

    t = cfg.train
    if t.eval_strategy != IntervalStrategy.no and m.test_split_size == 0:
        _fail(
            "train.eval_strategy",
            f"is '{t.eval_strategy.value}' but mixture.test_split_size is 0, so there is nothing to evaluate on",
            "Set mixture.test_split_size (e.g. 0.05) or train.eval_strategy=no",
        )
    if t.learning_rate <= 0 or math.isnan(t.learning_rate):
        _fail("train.learning_rate", f"must be > 0, got {t.learning_rate}", "")
    if not 0 <= t.warmup_ratio < 1:
        _fail("train.warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}", "")
    if t.max_steps <= 0 and t.num_train_epochs <= 0:
        _fail("train", "max_steps <= 0 and num_train_epochs <= 0: no training would happen", "Set one of them")
    if t.bf16 and cfg.model.dtype == DType.float16:
        _fail("train.bf16", "bf16 mixed precision with a float16 model", "Use model.dtype=bfloat16 or float32")

    d = cfg.distributed
    if d.nodes < 1 or d.processes_per_node < 1:
        _fail("distributed", "nodes and processes_per_node must be >= 1", "")
    if d.strategy == DistStrategy.single and d.nodes * d.processes_per_node != 1:
        _fail(
            "distributed.strategy",
            f"'single' runs one process, but nodes x processes_per_node = {d.nodes * d.processes_per_node}",
            "Set distributed.nodes=1 distributed.processes_per_node=1",
        )
    validate_distributed_and_resume(cfg)
    validate_peft(cfg)
    validate_generation(cfg)
    validate_harness(cfg)


def validate_harness(cfg: RunConfig) -> None:
    """eval.harness.*: values, the lm-eval package, the include paths, a harness/... sweep objective. The task names
    are resolved later, before the run directory exists (sft_exp.eval.harness.check_tasks: it indexes lm-eval's
    thousands of task files, seconds; eval.harness.extra is checked there too, against lm-eval's signature)."""
    import importlib.util

    from sft_exp.eval.objective import parts

    h = cfg.eval.harness
    objective = cfg.sweep.objective
    if objective.startswith("harness/"):
        task, _ = parts(objective)
        if not task:
            _fail(
                "sweep.objective", f"'{objective}' is not harness/<task>/<metric>", "e.g. harness/sftexp_arith_mc/acc"
            )
        if not h.tasks:
            _fail("sweep.objective", f"'{objective}' is a harness score but eval.harness.tasks is empty",
                  f"Set eval.harness.tasks=[{task}]")  # fmt: skip
    if not h.tasks:
        return
    if any(not isinstance(t, str) or not t.strip() for t in h.tasks):
        _fail("eval.harness.tasks", f"holds an empty name: {list(h.tasks)}", "e.g. eval.harness.tasks=[sftexp_demo]")
    if importlib.util.find_spec("lm_eval") is None:
        _fail("eval.harness.tasks", "needs EleutherAI's lm-evaluation-harness, which is not installed",
              "pip install 'sft-exp[harness]' (or pip install lm-eval), or eval.harness.tasks=[]")  # fmt: skip
    for i, p in enumerate(h.include_path):
        if not os.path.isdir(p):
            _fail(f"eval.harness.include_path[{i}]", f"'{p}' is not a folder", "Point it at a folder of task YAMLs")
    if h.limit is not None and not h.limit > 0:
        _fail("eval.harness.limit", f"must be > 0 (a count, or a share < 1), got {h.limit}", "e.g. 100, or null: all")
    if h.limit is not None and h.limit > 1 and h.limit != int(h.limit):
        _fail("eval.harness.limit", f"{h.limit} is neither a whole count nor a share < 1", "e.g. 100 or 0.1")
    if h.num_fewshot is not None and h.num_fewshot < 0:
        _fail("eval.harness.num_fewshot", f"must be >= 0, got {h.num_fewshot}", "")
    if h.batch_size < 1:
        _fail("eval.harness.batch_size", f"must be >= 1, got {h.batch_size}", "")
    if h.samples < 0:
        _fail("eval.harness.samples", f"must be >= 0, got {h.samples}", "")


def validate_generation(cfg: RunConfig) -> None:
    """eval.generate.* and every source's scorer (checked whether generation is on or not: a scorer that does not
    exist is an error either way); a gen/... sweep objective. Plug-in scorers are imported here."""
    from sft_exp.eval.scorers import check_objective, resolve_scorer

    g, m = cfg.eval.generate, cfg.mixture
    scorers = {
        name: resolve_scorer(s.scorer, dict(s.scorer_args or {}), f"mixture.sources.{name}")
        for name, s in m.sources.items()
    }
    for key in ("rows", "max_new_tokens", "batch_size"):
        if getattr(g, key) < 1:
            _fail(f"eval.generate.{key}", f"must be >= 1, got {getattr(g, key)}", "")
    if g.samples < 0:
        _fail("eval.generate.samples", f"must be >= 0, got {g.samples}", "")
    if g.when == GenerateWhen.steps and g.every_steps < 1:
        _fail(
            "eval.generate.every_steps",
            f"must be >= 1 with eval.generate.when=steps, got {g.every_steps}",
            "e.g. eval.generate.every_steps=50",
        )
    if g.when == GenerateWhen.end and g.every_steps:
        _fail(
            "eval.generate.every_steps",
            "is set but eval.generate.when=end does not use it",
            "Set eval.generate.when=steps, or drop the override",
        )
    objective = cfg.sweep.objective
    if objective.startswith("gen/"):
        if not g.enabled:
            _fail(
                "sweep.objective",
                f"'{objective}' is a generation metric but eval.generate.enabled=false",
                "Set eval.generate.enabled=true",
            )
        check_objective(objective, scorers)
    if not g.enabled:
        return
    if m.test_split_size == 0:
        _fail(
            "eval.generate.enabled",
            "is true but mixture.test_split_size is 0: there are no held-out rows to generate for",
            "Set mixture.test_split_size (e.g. 32) or eval.generate.enabled=false",
        )
    if m.test_split_size >= 1 and g.rows > m.test_split_size:
        _fail(
            "eval.generate.rows",
            f"{g.rows} rows per source, but mixture.test_split_size holds out {int(m.test_split_size)}",
            f"Use eval.generate.rows<={int(m.test_split_size)} or raise mixture.test_split_size",
        )


ZERO_STAGE = {DistStrategy.zero2: 2, DistStrategy.zero3: 3, DistStrategy.zero3_offload: 3}


def validate_distributed_and_resume(cfg: RunConfig) -> None:
    """distributed.* against its engine's settings, launcher.*, and resume. Device checks (GPUs present, processes
    per device) need torch and happen when the run starts (sft_exp.launch)."""
    d = cfg.distributed
    stage = ZERO_STAGE.get(d.strategy)
    if stage is not None:
        got = (d.deepspeed.get("zero_optimization") or {}).get("stage")
        if got != stage:
            _fail(
                "distributed.deepspeed.zero_optimization.stage",
                f"is {got} but distributed.strategy={d.strategy.value} means stage {stage}",
                f"Choose the group (distributed={d.strategy.value}), which brings the matching DeepSpeed config",
            )
        offload = (d.deepspeed.get("zero_optimization") or {}).get("offload_param", {}).get("device", "none")
        if (d.strategy == DistStrategy.zero3_offload) != (offload not in (None, "none")):
            _fail("distributed.deepspeed", f"offload_param.device={offload} contradicts {d.strategy.value}", "")
    elif d.deepspeed:
        _fail("distributed.deepspeed", f"is set but distributed.strategy={d.strategy.value}", "Use distributed=zero3")
    if d.fsdp and d.strategy != DistStrategy.fsdp:
        _fail("distributed.fsdp", f"is set but distributed.strategy={d.strategy.value}", "Use distributed=fsdp")
    if d.strategy == DistStrategy.fsdp and d.fsdp.get("activation_checkpointing") and cfg.train.gradient_checkpointing:
        # transformers refuses both (a traceback in every rank); say it before anything starts.
        _fail(
            "distributed.fsdp.activation_checkpointing",
            "and train.gradient_checkpointing are both true: activations would be checkpointed twice",
            "Keep FSDP's (train.gradient_checkpointing=false), which FSDP2 prefers",
        )
    if d.strategy == DistStrategy.fsdp and str(d.fsdp.get("version", 1)) != "2":
        # FSDP1 is deprecated in torch and accelerate, and cannot run on CPU ranks (sft_exp.launch.distributed).
        _fail(
            "distributed.fsdp.version",
            f"is {d.fsdp.get('version', '<absent>')}: sft-exp runs FSDP2 only",
            "Use distributed=fsdp (version: 2) or distributed.fsdp.version=2",
        )
    if d.master_port and not 1024 <= d.master_port <= 65535:
        _fail("distributed.master_port", f"{d.master_port} is not a port in 1024-65535", "Use 0 to pick a free one")
    if d.timeout_minutes < 1:
        _fail("distributed.timeout_minutes", f"must be >= 1, got {d.timeout_minutes}", "")
    if cfg.launcher.timeout_min < 1 or cfg.launcher.max_requeues < 0:
        _fail("launcher", "timeout_min must be >= 1 and max_requeues >= 0", "")
    r = cfg.resume
    if isinstance(r, str):
        if not (Path(r) / "run_config.yaml").is_file():
            _fail(
                "resume",
                f"'{r}' is not a sft-exp run directory (no run_config.yaml in it)",
                "Use resume=true (the latest run of the same command) or resume=<a run directory>",
            )
    elif not isinstance(r, bool):
        _fail("resume", f"must be true, false or a run directory, got {r!r}", "")


# peft.* fields that only mean something for some methods: setting them for another method would be silently ignored.
_LORA_FIELDS = ("r", "alpha", "dropout", "target_modules", "modules_to_save", "merge", "extra")
_QUANT_FIELDS = ("quant_type", "double_quant")
QLORA_NO_CUDA = (
    "peft.method: qlora loads the base in 4 bits through bitsandbytes, which needs a CUDA GPU, and this machine has "
    "none (torch.cuda.is_available() is False). Use peft=lora here, or run peft=qlora on a GPU machine"
)


def validate_peft(cfg: RunConfig) -> None:
    """peft.*: values in range, nothing set that the method would ignore, qlora only where CUDA and bitsandbytes are."""
    import importlib.util

    p = cfg.peft
    default = PeftConfig()
    ignored = {PeftMethod.none: _LORA_FIELDS + _QUANT_FIELDS, PeftMethod.lora: _QUANT_FIELDS}.get(p.method, ())
    for name in ignored:
        if getattr(p, name) != getattr(default, name):
            _fail(
                f"peft.{name}",
                f"is set but peft.method={p.method.value} does not use it",
                "Choose peft=lora (or peft=qlora) to train adapters, or drop the override",
            )
    if p.method == PeftMethod.none:
        return
    if p.r < 1:
        _fail("peft.r", f"must be >= 1, got {p.r}", "Typical ranks are 8-64, e.g. peft.r=16")
    if p.alpha <= 0:
        _fail("peft.alpha", f"must be > 0, got {p.alpha}", "A common choice is twice the rank, e.g. peft.alpha=32")
    if not 0 <= p.dropout < 1 or math.isnan(p.dropout):
        _fail("peft.dropout", f"must be in [0, 1), got {p.dropout}", "e.g. peft.dropout=0.05")
    if p.target_modules is not None and not p.target_modules:
        _fail("peft.target_modules", "is an empty list: no layer would get an adapter", "Use null for the default")
    if p.target_modules and "lm_head" in p.target_modules:
        _fail(
            "peft.target_modules",
            "contains lm_head: TRL computes the loss from lm_head.weight directly, so an adapter there never trains",
            "Remove it; to train the LM head fully use peft.modules_to_save=[lm_head]",
        )
    if importlib.util.find_spec("peft") is None:
        _fail("peft.method", f"is {p.method.value} but the peft package is not installed", "pip install peft")
    if p.extra:
        import dataclasses

        from peft import LoraConfig

        known = {f.name for f in dataclasses.fields(LoraConfig)}
        ours = {"r", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save", "task_type"}
        for key in p.extra:
            if key not in known:
                _fail(f"peft.extra.{key}", "is not a field of peft.LoraConfig", "Check the name (e.g. use_rslora)")
            if key in ours:
                _fail(f"peft.extra.{key}", "is set by sft-exp from another key", "Use peft.r / alpha / dropout / ...")
    if p.method == PeftMethod.qlora:
        import torch  # only for qlora: the one check that needs it, and it must run before anything loads

        if not torch.cuda.is_available():
            raise ConfigError(QLORA_NO_CUDA)
        if importlib.util.find_spec("bitsandbytes") is None:
            _fail("peft.method", "is qlora but the bitsandbytes package is not installed", "pip install bitsandbytes")
        if cfg.model.init == ModelInit.random:
            _fail(
                "peft.method",
                "qlora quantises pretrained weights as they load, and model.init=random has none",
                "Use a pretrained model (model.init=pretrained), or peft=lora",
            )
        if cfg.distributed.strategy in (DistStrategy.fsdp, DistStrategy.zero3, DistStrategy.zero3_offload):
            _fail(
                "peft.method",
                f"qlora with distributed={cfg.distributed.strategy.value} (sharded 4-bit weights) is not supported",
                "Use distributed=single or distributed=ddp (each GPU holds the 4-bit base), or peft=lora",
            )


# Environment variables whose values are secrets: a config value equal to one of them is refused (a key in a config
# ends up in run_config.yaml, in logs and in the tracker's config).
SECRET_ENV = re.compile(r"(API_KEY|ACCESS_KEY|_TOKEN$|^TOKEN$|SECRET|PASSWORD|PASSWD)", re.IGNORECASE)


def secret_env_values() -> dict[str, str]:
    """{value: env var name} of the secrets in the environment (8+ characters, so 'true' or '1' never match)."""
    return {v: k for k, v in os.environ.items() if SECRET_ENV.search(k) and len(v) >= 8}


def validate_tracking_and_sweep(cfg: RunConfig) -> None:
    """tracking.* and sweep.*: the backend is installed and can log in; no secret sits in the config."""
    import importlib.util
    from dataclasses import asdict

    secrets = secret_env_values()

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")
        elif isinstance(node, str):
            for value, name in secrets.items():
                if value in node:
                    _fail(path, f"holds the value of ${name}", "Secrets come from the environment only: remove it")

    walk(asdict(cfg), "")
    t = cfg.tracking
    if t.backend == TrackingBackend.wandb:
        if importlib.util.find_spec("wandb") is None:
            _fail("tracking", "is wandb but the wandb package is not installed", "pip install 'sft-exp[tracking]'")
        netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
        logged_in = "WANDB_API_KEY" in os.environ or (netrc.exists() and "wandb" in netrc.read_text(errors="ignore"))
        if t.mode == WandbMode.online and not logged_in:
            _fail(
                "tracking.mode",
                "is online but no W&B key is set (WANDB_API_KEY in the environment, or `wandb login`)",
                "Export WANDB_API_KEY, or use tracking.mode=offline and `wandb sync` later",
            )
        if not t.project:
            _fail("tracking.project", "is empty", "Name the W&B project, e.g. tracking.project=sft-exp")
    if t.backend == TrackingBackend.tensorboard and importlib.util.find_spec("tensorboard") is None:
        _fail("tracking", "is tensorboard but the tensorboard package is not installed", "pip install tensorboard")
    clash = {"wandb", "tensorboard", "all"} & set(cfg.train.report_to)
    if clash:
        _fail(
            "train.report_to",
            f"asks transformers for {sorted(clash)}: that would open a second, unnamed run",
            f"Use tracking={sorted(clash - {'all'})[0] if clash - {'all'} else 'wandb'} and train.report_to=[none]",
        )
    names = set(cfg.mixture.sources)
    # a generation metric or a harness score: checked by validate_generation / validate_harness
    scored = cfg.sweep.objective.startswith(("gen/", "harness/"))
    if cfg.sweep.objective != "all" and cfg.sweep.objective not in names and not scored:
        _fail(
            "sweep.objective",
            f"'{cfg.sweep.objective}' is neither 'all' nor a source of the mixture, nor gen/<source or all>/<metric> "
            "nor harness/<task>/<metric>",
            f"Use all, one of {sorted(names)}, e.g. gen/all/score (with eval.generate.enabled=true) or "
            "harness/sftexp_arith_mc/acc (with eval.harness.tasks=[sftexp_demo])",
        )


def check_sft_extra(extra: dict[str, Any], sft_fields: set[str], explicit: set[str]) -> None:
    """`train.extra` may only hold real SFTConfig fields that sft-exp does not already set explicitly."""
    for key in extra:
        if key not in sft_fields:
            close = sorted(f for f in sft_fields if key.split("_")[0] in f)[:5]
            _fail(f"train.extra.{key}", "is not a field of trl.SFTConfig", f"Check the name; similar fields: {close}")
        if key in explicit:
            _fail(f"train.extra.{key}", "is set by sft-exp from another key", f"Set it through train.{key} instead")


# ------------------------------------------------------------------------------------------------------ Hydra glue
def register_asset_resolver() -> None:
    """`${asset:<path>}`: a file shipped in sft_exp/assets (the tiny model, demo data, templates). Idempotent."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", lambda rel: str(ASSETS / rel))


def to_run_config(cfg: Any) -> RunConfig:
    """A composed (or loaded) DictConfig -> the typed RunConfig, interpolations resolved."""
    from omegaconf import DictConfig, OmegaConf

    register_asset_resolver()
    if isinstance(cfg, DictConfig) and cfg.get("lock"):
        from sft_exp.lock import apply_lock

        try:
            cfg = apply_lock(cfg, str(cfg.lock))
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from e
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), _upgrade_legacy_keys(cfg))
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, RunConfig)
    _apply_source_defaults(obj.mixture)
    from sft_exp.data.mixture import apply_mixture_draw

    apply_mixture_draw(obj.mixture)  # mixture.draw=i: the weights of random mixture i (sweep=mixture_random)
    if obj.cache_dir:
        obj.cache_dir = os.path.abspath(os.path.expanduser(obj.cache_dir))  # ranks and tools agree wherever they run
    # frozen absolute: a resumed run, a Slurm job or `evaluate` started elsewhere finds the same task folders
    obj.eval.harness.include_path = [os.path.abspath(os.path.expanduser(p)) for p in obj.eval.harness.include_path]
    return obj


def _apply_source_defaults(m: MixtureConfig) -> None:
    """Fill each source's unset (null) fields from mixture.source_defaults; id/config/revision only without `path`."""
    d = m.source_defaults
    for s in m.sources.values():
        if s.path is None:
            s.id = d.id if s.id is None else s.id
            s.config = d.config if s.config is None else s.config
            s.revision = d.revision if s.revision is None else s.revision
        if s.columns is None and d.columns is not None:
            s.columns = list(d.columns)


def _upgrade_legacy_keys(cfg: Any) -> Any:
    """Read a run_config.yaml frozen by an older sft-exp (a resumed or requeued run) in today's spelling:
    packing.enabled=false is strategy=none, strategy=bfd_split is bfd + overflow=split, launcher.kind is gone.
    On the command line these keys fail at composition: they are not in the schema."""
    from omegaconf import DictConfig, OmegaConf

    packing, launcher = cfg.get("packing"), cfg.get("launcher")
    old_packing = isinstance(packing, DictConfig) and ("enabled" in packing or packing.get("strategy") == "bfd_split")
    if not old_packing and not (isinstance(launcher, DictConfig) and "kind" in launcher):
        return cfg
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    if "enabled" in cfg.packing and not cfg.packing.pop("enabled"):
        cfg.packing.strategy = "none"
    if cfg.packing.get("strategy") == "bfd_split":
        cfg.packing.strategy, cfg.packing.overflow = "bfd", "split"
    if "launcher" in cfg:
        cfg.launcher.pop("kind", None)
    return cfg


def dump_run_config(run: RunConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(run))
