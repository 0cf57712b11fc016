"""A trained model on disk: the run directory or checkpoint a path names, and its config, tokenizer and model loaded
ready to generate (sft_exp.evaluate, sft_exp.chat, eval.harness after training, bench/bench_generate.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sft_exp.errors import ConfigError


def locate(path: Path) -> tuple[Path, Path]:
    """(run directory, model directory) of a run directory or one of its checkpoints.

    Raises:
        ConfigError: not a run or checkpoint directory, or no model in it (an unfinished run).
    """
    path = Path(path)
    if (path / "run_config.yaml").is_file():
        run_dir, model_dir = path, path
        if (path / "merged" / "config.json").is_file():
            model_dir = path / "merged"
    elif path.name.startswith("checkpoint-") and (path.parent / "run_config.yaml").is_file():
        run_dir, model_dir = path.parent, path
    else:
        raise ConfigError(
            f"{path}: neither a sft-exp run directory (no run_config.yaml) nor a checkpoint-N folder of one. "
            "Give outputs/runs/<date>/<time> or one of its checkpoint-N folders"
        )
    if not any((model_dir / f).is_file() for f in ("config.json", "adapter_config.json")):
        ckpts = sorted(
            (p for p in run_dir.glob("checkpoint-*") if p.name.rsplit("-", 1)[1].isdigit()),
            key=lambda p: int(p.name.rsplit("-", 1)[1]),
        )
        hint = f"Evaluate a checkpoint instead, e.g. {ckpts[-1]}" if ckpts else "Finish (or resume) the run first"
        raise ConfigError(f"{model_dir}: no saved model here (the run has not finished). {hint}")
    return run_dir, model_dir


def load_trained(path: Path, device: str | None = None, base: bool = False) -> tuple[Any, Any, Any, Path, Path]:
    """The frozen config, tokenizer and model of a run directory or checkpoint, ready to generate.

    Args:
        path: a run directory or one of its checkpoint-N folders.
        device: 'cpu', 'cuda', ...; None: cuda when available, else cpu.
        base: the model the run started from instead (model.name_or_path; under model.init=random the same seeded
            initial weights), with the run's tokenizer and template: scores before training to compare with.

    Returns:
        (run config, tokenizer, model (eval mode, sdpa attention), run directory, model directory).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_exp.config.frozen import load_frozen

    run_dir, model_dir = locate(path)
    run = load_frozen(run_dir)
    saved = [d for d in (model_dir, run_dir) if (d / "tokenizer_config.json").is_file()]
    if saved:  # the tokenizer as the run saved it (its chat template and end-of-turn token included)
        tokenizer = AutoTokenizer.from_pretrained(str(saved[0]))
    else:  # a checkpoint saved without it: rebuilt from the run's config, as the run built it
        from sft_exp.train.model import build_tokenizer

        tokenizer = build_tokenizer(run)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, run.model.dtype.value) if device != "cpu" else torch.float32  # bf16 is slow on CPUs
    if base:
        model = _base_model(run, tokenizer, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype, attn_implementation="sdpa", trust_remote_code=run.model.trust_remote_code
        )
    model.to(device).eval()
    return run, tokenizer, model, run_dir, model_dir


def _base_model(run: Any, tokenizer: Any, dtype: Any) -> Any:
    """The run's starting model, built the way the run built it (sft_exp.train.model.build_model), full precision
    and sdpa attention for generation."""
    import copy

    from sft_exp.config import AttnImpl, DType, PeftMethod
    from sft_exp.train.model import build_model

    start = copy.deepcopy(run)
    start.model.attn_implementation = AttnImpl.sdpa
    start.model.dtype = DType(str(dtype).removeprefix("torch."))
    if start.peft.method == PeftMethod.qlora:  # the base in full precision: scores of the model, not its 4-bit copy
        start.peft.method = PeftMethod.none
    return build_model(start, tokenizer)
