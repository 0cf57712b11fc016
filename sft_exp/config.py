"""The typed schema under the YAML: one dataclass per config group, registered in Hydra's ConfigStore.

Hydra merges `conf/**.yaml` into these dataclasses, so an unknown key, a wrong type or an invalid enum value fails
at composition, naming the key. Cross-field checks that a type cannot express live in `validate()` methods and run
before any model or data is touched. This module imports nothing heavy (no torch, no transformers), so `--cfg`,
`--help` and composition errors stay fast.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parent / "assets"


class ConfigError(ValueError):
    """A configuration problem found before anything heavy runs; the message says what, where and how to fix."""


# --------------------------------------------------------------------------------------------------------- choices
class Mode(str, Enum):
    train = "train"
    prepare = "prepare"


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


class Weighting(str, Enum):
    fraction = "fraction"  # keep floor(w x rows) rows of a source; w > 1 upsamples, w = 0 drops it


class BadRows(str, Enum):
    error = "error"
    drop = "drop"


class PackingStrategy(str, Enum):
    ffd = "ffd"  # ours: first-fit-decreasing over the whole training set at once
    bfd = "bfd"  # global best-fit-decreasing (TRL's name; ours runs over the whole set, not 1000-row chunks)
    wrapped = "wrapped"  # concatenate and cut every max_length tokens (sequences straddle rows)
    none = "none"  # one sequence per row


class Overflow(str, Enum):
    truncate = "truncate"
    split = "split"
    drop = "drop"


class DistStrategy(str, Enum):
    single = "single"


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


@dataclass
class SourceConfig:
    id: str | None = None  # a hub dataset id, read with datasets.load_dataset
    path: str | None = None  # a local .jsonl/.json/.parquet/.arrow file, a folder of them, or a saved dataset
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    columns: list[str] | None = None  # columns kept; default: messages (+ chat_template_kwargs when present)
    weight: float = 1.0  # unit set by mixture.weighting


@dataclass
class MixtureConfig:
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    weighting: Weighting = Weighting.fraction
    seed: int = 0
    # Held-out rows per source, drawn before weighting: < 1 is a fraction of the source, >= 1 a row count.
    test_split_size: float = 0.0
    on_bad_rows: BadRows = BadRows.error
    num_proc: int = 1


@dataclass
class PackingConfig:
    enabled: bool = True
    strategy: PackingStrategy = PackingStrategy.ffd
    max_length: int = 1024
    overflow: Overflow = Overflow.truncate


@dataclass
class DistributedConfig:
    strategy: DistStrategy = DistStrategy.single
    nodes: int = 1
    processes_per_node: int = 1


@dataclass
class TrainConfig:
    """SFTConfig-level fields. Anything else SFTConfig takes goes in `extra`, checked against its fields."""

    learning_rate: float = 2e-5
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 1
    per_device_eval_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = "linear"
    lr_scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    bf16: bool = False  # TRL defaults this to True; on a CPU it is 6x slower, so we default to False
    gradient_checkpointing: bool = False
    save_strategy: str = "no"
    save_steps: float = 500
    save_total_limit: int | None = None
    logging_steps: float = 10
    eval_strategy: str = "no"
    eval_steps: float | None = None
    assistant_only_loss: bool = True
    use_liger_kernel: bool = False
    report_to: list[str] = field(default_factory=lambda: ["none"])
    dataloader_num_workers: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mode: Mode = Mode.train
    # Where tokenised sources are cached (shared by every run of a sweep); null = <repo>/outputs/cache.
    cache_dir: str | None = None
    # Evaluate every source before training so metrics.json can show how much each eval loss dropped.
    eval_before_train: bool = True
    # The experiment preset chosen, if any (set by conf/experiment/*.yaml; informational).
    experiment: str | None = None


# ------------------------------------------------------------------------------------------------------ validation
def _fail(where: str, what: str, fix: str) -> None:
    raise ConfigError(f"{where}: {what}. {fix}")


def validate(cfg: RunConfig) -> None:
    """Cross-field checks that the schema's types cannot express. Cheap: no model or data is loaded."""
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
    if m.test_split_size < 0 or math.isnan(m.test_split_size):
        _fail("mixture.test_split_size", f"must be >= 0, got {m.test_split_size}", "Use a fraction < 1 or a count")
    if m.test_split_size >= 1 and m.test_split_size != int(m.test_split_size):
        _fail("mixture.test_split_size", f"{m.test_split_size} is neither a fraction < 1 nor a whole count", "")
    if m.num_proc < 1:
        _fail("mixture.num_proc", f"must be >= 1, got {m.num_proc}", "")

    p = cfg.packing
    if p.max_length < 16:
        _fail("packing.max_length", f"{p.max_length} is too small to hold a chat turn", "Use at least a few hundred")
    if p.enabled and p.strategy != PackingStrategy.none and cfg.model.attn_implementation == AttnImpl.eager:
        pass  # eager honours position_ids-based packed masks in transformers 5; kept allowed.

    t = cfg.train
    if t.eval_strategy != "no" and m.test_split_size == 0:
        _fail(
            "train.eval_strategy",
            f"is '{t.eval_strategy}' but mixture.test_split_size is 0, so there is nothing to evaluate on",
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


def check_sft_extra(extra: dict[str, Any], sft_fields: set[str], explicit: set[str]) -> None:
    """`train.extra` may only hold real SFTConfig fields that sft-exp does not already set explicitly."""
    for key in extra:
        if key not in sft_fields:
            close = sorted(f for f in sft_fields if key.split("_")[0] in f)[:5]
            _fail(f"train.extra.{key}", "is not a field of trl.SFTConfig", f"Check the name; similar fields: {close}")
        if key in explicit:
            _fail(f"train.extra.{key}", "is set by sft-exp from another key", f"Set it through train.{key} instead")


# ------------------------------------------------------------------------------------------------------ Hydra glue
def register_configs() -> None:
    """Register the schema in Hydra's ConfigStore and the `${asset:...}` resolver. Idempotent."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", lambda rel: str(ASSETS / rel))
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def to_run_config(cfg: Any) -> RunConfig:
    """A composed (or loaded) DictConfig -> the typed RunConfig, interpolations resolved."""
    from omegaconf import OmegaConf

    register_configs()
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), cfg)
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, RunConfig)
    return obj


def dump_run_config(run: RunConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(run))
