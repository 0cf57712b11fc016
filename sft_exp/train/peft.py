"""peft.* -> the peft.LoraConfig handed to SFTTrainer, the 4-bit base of qlora, and what a run writes for its adapter.

TRL wraps the model (get_peft_model) when it receives `peft_config`, and patches its fused LM head onto the wrapped
model's base, so everything downstream (packing, per-source loss, eval, DDP) sees the same trainer as full
fine-tuning. What a peft=lora|qlora run leaves in its run directory:

    adapter_config.json, adapter_model.safetensors (+ tokenizer)  peft.AutoPeftModelForCausalLM.from_pretrained(run_dir)
    base/    the frozen base, only when model.name_or_path cannot give it back (model.init=random: there are no
             weights to reload; or embeddings resized for a larger tokenizer). adapter_config.json names it.
    merged/  with peft.merge=true: the base with the adapter folded in, AutoModelForCausalLM.from_pretrained(...)

Nothing here is single-process only: the base and the merged model are written by rank 0 (the others wait at a
barrier), and the adapter by the Trainer's own save_model.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

from sft_exp.compat import without_zero3_init
from sft_exp.config import ConfigError, ModelInit, PeftMethod, RunConfig
from sft_exp.ranks import is_main_process
from sft_exp.train.model import align_with_tokenizer, count_parameters

# Architectures whose linear layers carry llama's names; LoRA goes on all seven projections of every block (the
# QLoRA paper's finding: adapters on every linear layer match full fine-tuning, attention-only ones do not).
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_LIKE = {
    "llama",
    "smollm3",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "olmo",
    "olmo2",
    "granite",
    "cohere",
    "helium",
}
ALL_LINEAR = "all-linear"  # peft's own: every nn.Linear except the output layer (LM head)
BASE_DIR = "base"
MERGED_DIR = "merged"


def default_target_modules(model_type: str) -> list[str] | str:
    return list(LLAMA_PROJECTIONS) if model_type in LLAMA_LIKE else ALL_LINEAR


def resolve_target_modules(run: RunConfig, model_type: str) -> list[str] | str:
    t = run.peft.target_modules
    if not t:
        return default_target_modules(model_type)
    return ALL_LINEAR if list(t) == [ALL_LINEAR] else list(t)


def build_peft_config(run: RunConfig, model: Any) -> Any:
    """peft.* -> peft.LoraConfig (None for peft=none: full fine-tuning)."""
    p = run.peft
    if p.method == PeftMethod.none:
        return None
    from peft import LoraConfig

    extra = dict(p.extra)
    if p.modules_to_save:
        # A model whose LM head shares the embedding matrix (SmolLM3, the tiny model) keeps sharing it when one of
        # them is trained in full, as in full fine-tuning: otherwise peft trains a copy on one side only (e.g.
        # modules_to_save=[embed_tokens] would leave the LM head frozen at the old embeddings).
        tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
        extra.setdefault("ensure_weight_tying", tied)
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=p.r,
        lora_alpha=p.alpha,
        lora_dropout=p.dropout,
        target_modules=resolve_target_modules(run, model.config.model_type),
        modules_to_save=list(p.modules_to_save) if p.modules_to_save else None,
        **extra,
    )


def _is_main_process() -> bool:

    return is_main_process()


def _base_reloadable(run: RunConfig, model: Any) -> bool:
    """True when model.name_or_path(+revision) gives back exactly the frozen base the adapter was trained on."""
    if run.model.init == ModelInit.random:
        return False

    m = run.model
    cfg = AutoConfig.from_pretrained(m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    vocab = getattr(cfg.get_text_config(), "vocab_size", None)
    return vocab is None or vocab == model.get_input_embeddings().weight.shape[0]


def _save_atomically(write: Any, dest: Path) -> None:
    """write(tmp_dir), then swap it in, so a crash never leaves a half-written folder under the final name."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def _targets(peft_model: Any) -> list[str] | str:
    """The modules the adapter went on, as peft resolved them (a set for names, a string for a regex)."""
    t = peft_model.peft_config["default"].target_modules
    return sorted(t) if isinstance(t, (set, list)) else t


@dataclass
class AdapterRun:
    """The peft side of one training run: setup() before the trainer, attach() after it, finish() after saving."""

    run: RunConfig
    run_dir: Path
    config: Any = None  # peft.LoraConfig for SFTTrainer(peft_config=...); None for peft=none
    base_ref: str | None = None  # what adapter_config.json names as the base: a hub id/folder, or <run_dir>/base
    base_revision: str | None = None

    def attach(self, trainer: Any) -> dict[str, int]:
        """Point the adapter's config at its base (checkpoints and the final save carry it) and report parameters."""
        model = trainer.model
        if self.config is not None:
            for pc in model.peft_config.values():
                pc.base_model_name_or_path = self.base_ref
                pc.revision = self.base_revision
        trainable, total = count_parameters(model)
        if trainer.is_world_process_zero():
            what = "full fine-tuning" if self.config is None else self._describe(model)
            print(
                f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / max(total, 1):.2f}%), {what}",
                flush=True,
            )
        return {"trainable_parameters": trainable, "total_parameters": total}

    def _describe(self, model: Any) -> str:
        p = self.run.peft
        return f"{p.method.value} r={p.r} alpha={p.alpha} on {_targets(model)}"

    def finish(self, trainer: Any, tokenizer: Any) -> dict[str, Any]:
        """After trainer.save_model(run_dir) wrote the adapter: the merged model (peft.merge=true) and the metrics."""
        if self.config is None:
            return {}
        p = self.run.peft
        info: dict[str, Any] = {
            "method": p.method.value,
            "r": p.r,
            "alpha": p.alpha,
            "target_modules": _targets(trainer.model),
            "adapter_dir": str(self.run_dir),
            "base": self.base_ref,
        }
        if p.merge:
            if trainer.is_world_process_zero():
                save_merged(self.run, self.run_dir, self.base_ref, self.base_revision, tokenizer)
                print(f"merged model: {self.run_dir / MERGED_DIR}", flush=True)
            trainer.accelerator.wait_for_everyone()  # no rank exits (tearing the group down) while rank 0 merges
            info["merged_dir"] = str(self.run_dir / MERGED_DIR)
        return {"peft": info}


def setup(run: RunConfig, model: Any, tokenizer: Any, run_dir: Any) -> AdapterRun:
    """Before the trainer wraps `model`: its LoraConfig, and the base saved into the run when it cannot be reloaded."""
    run_dir = Path(run_dir)
    config = build_peft_config(run, model)
    if config is None:
        return AdapterRun(run, run_dir)
    if _base_reloadable(run, model):
        ref = run.model.name_or_path
        # A local folder by absolute path: the adapter is loaded from anywhere, not from the launch directory.
        ref = str(Path(ref).resolve()) if Path(ref).is_dir() else ref
        return AdapterRun(run, run_dir, config, ref, run.model.revision)
    if run.peft.method == PeftMethod.qlora:
        raise ConfigError(
            "peft.method: qlora cannot save its base for reloading (the tokenizer outgrew the model's vocabulary, so "
            "the base differs from model.name_or_path). Use peft=lora with peft.modules_to_save=[embed_tokens]"
        )
    base = run_dir / BASE_DIR

    # Saved before get_peft_model injects adapter layers into `model` (its state dict would then hold them).
    def write(d: Path) -> None:
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)

    with _gathered(model):  # ZeRO-3 built the model partitioned: every rank joins the gather, rank 0 writes
        if _is_main_process():
            _save_atomically(write, base)
    return AdapterRun(run, run_dir, config, str(base.resolve()), None)


@contextmanager
def _gathered(model: Any) -> Iterator[None]:
    """Whole parameters inside the block when DeepSpeed ZeRO-3 partitioned them (a collective: all ranks enter)."""
    if not is_deepspeed_zero3_enabled():
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield


def save_merged(run: RunConfig, run_dir: Path, base_ref: Any, revision: str | None, tokenizer: Any) -> Path:
    """Reload the base in model.dtype (never 4-bit), fold the saved adapter in, write <run_dir>/merged/.

    Merging from the files rather than the in-memory model also proves the saved adapter loads, and for qlora
    merges into full-precision weights instead of re-quantising."""
    from peft import PeftModel

    m = run.model
    with without_zero3_init():
        base = AutoModelForCausalLM.from_pretrained(
            base_ref, revision=revision, dtype=getattr(torch, m.dtype.value), trust_remote_code=m.trust_remote_code
        )
    base = align_with_tokenizer(base, tokenizer)
    merged = PeftModel.from_pretrained(base, str(run_dir)).merge_and_unload()

    def write(d: Path) -> None:
        merged.save_pretrained(d)
        tokenizer.save_pretrained(d)

    dest = Path(run_dir) / MERGED_DIR
    _save_atomically(write, dest)
    return dest
