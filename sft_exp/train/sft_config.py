"""RunConfig -> trl.SFTConfig, field by field (greppable: every value the Trainer gets is set here)."""

from __future__ import annotations

import dataclasses
import tempfile

from trl import SFTConfig

from sft_exp.compat import reset_accelerate_state
from sft_exp.config import ConfigError, DistStrategy, RunConfig, TrainConfig, check_sft_extra
from sft_exp.train.distributed import trainer_kwargs

# SFTConfig fields sft-exp sets itself (from train.* or from other groups); train.extra may not set them.
EXPLICIT_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"extra"} | {
    "output_dir",
    "max_length",
    "packing",
    "padding_free",
    "dataset_kwargs",
    "remove_unused_columns",
    "data_seed",
    "logging_first_step",
    "warmup_steps",
    "use_cpu",
    # set from distributed.* (sft_exp.launch.distributed.trainer_kwargs)
    "ddp_backend",
    "ddp_timeout",
    "ddp_find_unused_parameters",
    "deepspeed",
    "fsdp",
    "fsdp_config",
    "activation_checkpointing",  # train.gradient_checkpointing, under its transformers >= 5.2x name
}

# transformers (5.2x) renamed gradient_checkpointing* to activation_checkpointing* and warns on the old names (gone in
# v6). The config keeps the name the recipe and TRL's docs use; the Trainer gets whichever name it has.
_CHECKPOINTING_RENAMES = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


def _trainer_name(key: str, fields: set[str]) -> str:
    new = _CHECKPOINTING_RENAMES.get(key)
    return new if new is not None and new in fields else key


def build_sft_config(run: RunConfig, output_dir: str) -> SFTConfig:
    """RunConfig -> trl.SFTConfig, field by field.

    Args:
        run: the validated run config; `train.*` maps onto the SFTConfig fields of the same name, `distributed.*`
            onto the DDP / FSDP / DeepSpeed fields, `train.extra` passes any other SFTConfig field through.
        output_dir: the run directory (checkpoints and the final model go there).

    Returns:
        The SFTConfig the Trainer runs with. Packing and the assistant mask are done by sft-exp's data stage, so
        TRL's own packing, padding-free collation and assistant_only_loss are off and dataset preparation is skipped.

    Example:
        >>> from sft_exp.config import RunConfig
        >>> build_sft_config(RunConfig(), "/tmp/run").learning_rate  # the schema default
        2e-05
    """
    t = run.train
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    check_sft_extra(t.extra, fields, EXPLICIT_FIELDS)
    return SFTConfig(
        output_dir=output_dir,
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        lr_scheduler_type=t.lr_scheduler_type.value,
        lr_scheduler_kwargs=dict(t.lr_scheduler_kwargs),
        # transformers 5 dropped warmup_ratio: a float in [0, 1) given as warmup_steps is read as that ratio.
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        bf16=t.bf16,
        **{_trainer_name("gradient_checkpointing", fields): t.gradient_checkpointing},
        save_strategy=t.save_strategy.value,
        save_steps=t.save_steps,
        # sft_exp.checkpoints rotates instead (train.save_total_limit): the Trainer's rotation counts half-written
        # checkpoints and runs before a checkpoint is marked complete.
        save_total_limit=None,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy=t.eval_strategy.value,
        eval_steps=t.eval_steps,
        use_liger_kernel=t.use_liger_kernel,
        report_to=list(t.report_to),
        dataloader_num_workers=t.dataloader_num_workers,
        # DDP / FSDP / DeepSpeed settings, and use_cpu on a machine without a GPU (sft_exp.launch.distributed).
        **trainer_kwargs(run),
        # The assistant mask is applied by our data stage (labels = -100 outside assistant spans); TRL's own
        # assistant_only_loss would re-tokenise conversations, which our pre-tokenised rows no longer are.
        assistant_only_loss=False,
        # Packing is done by sft_exp.data.packing before the trainer sees the data.
        packing=False,
        padding_free=False,
        max_length=run.packing.max_length,
        dataset_kwargs={"skip_prepare_dataset": True},
        # Keep seq_lengths / seq_sources for the collator.
        remove_unused_columns=False,
        **{_trainer_name(k, fields): v for k, v in t.extra.items()},
    )


def check_trainer_config(run: RunConfig) -> None:
    """Build the SFTConfig once, dry, and turn what transformers / TRL refuse into ConfigError naming the key.

    Runs before the run directory exists. Single-process (the DeepSpeed / FSDP fields need a process group and are
    checked by distributed.*); accelerate's process state the build creates is reset afterwards, so the real run
    starts from scratch."""
    dry = dataclasses.replace(run, distributed=dataclasses.replace(run.distributed, strategy=DistStrategy.single))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            build_sft_config(dry, tmp)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the dry build refuses is about the values given
            text = " ".join(str(e).split())
            key = next((f"train.extra.{k}" for k, v in run.train.extra.items() if str(v) in text or k in text), "train")
            raise ConfigError(f"{key}: transformers refuses it: {text[:400]}. Fix the value") from None
        finally:
            reset_accelerate_state()
