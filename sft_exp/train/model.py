"""Tokenizer and model from the model and template configs, through the real from_pretrained calls."""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed

from sft_exp.config import ModelInit, PeftMethod, RunConfig
from sft_exp.data.template import GENERATION_RE, read_template
from sft_exp.errors import ConfigError, TemplateError
from sft_exp.train.attention import register


def build_tokenizer(run: RunConfig) -> Any:
    """AutoTokenizer.from_pretrained(model.name_or_path), with the configured chat template and end-of-turn token."""
    m, t = run.model, run.template
    tok = AutoTokenizer.from_pretrained(m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    template = read_template(t.chat_template)
    if template is not None:
        tok.chat_template = template
    if not tok.chat_template:
        raise TemplateError(
            f"template: the tokenizer of '{m.name_or_path}' has no chat template and template.chat_template is null. "
            "Choose template=smollm3 or template=chatml"
        )
    if run.train.assistant_only_loss and not re.search(GENERATION_RE, tok.chat_template):
        raise TemplateError(
            "template: train.assistant_only_loss=true but the chat template has no {% generation %} markers, so no "
            "token would be marked as assistant. Use template=smollm3 or template=chatml (both carry markers), "
            "or add the markers to your template"
        )
    if t.eos_token is not None:
        if t.eos_token not in tok.get_vocab():
            raise TemplateError(f"template.eos_token: '{t.eos_token}' is not a token of the tokenizer")
        tok.eos_token = t.eos_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_model(run: RunConfig, tokenizer: Any) -> Any:
    """from_pretrained for real checkpoints; from_config (seeded) for model.init=random smoke tests."""
    register()  # attn_implementation=varlen
    m = run.model
    dtype = getattr(torch, m.dtype.value)
    common: dict[str, Any] = {"dtype": dtype, "attn_implementation": m.attn_implementation.value}
    common.update(quantization_kwargs(run))  # peft=qlora: a 4-bit base on this rank's GPU; {} otherwise
    if m.init == ModelInit.random:
        config = AutoConfig.from_pretrained(m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code)
        set_seed(run.train.seed)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=m.trust_remote_code, **common)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code, **common
        )
    return align_with_tokenizer(model, tokenizer)


def align_with_tokenizer(model: Any, tokenizer: Any) -> Any:
    """Room for every token of the tokenizer, and its end-of-turn/pad ids in the model's configs (also used when the
    base is reloaded to merge an adapter, so the merged model generates like the trained one)."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    # Generation stops at the end-of-turn token the template trains.
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def quantization_kwargs(run: RunConfig) -> dict[str, Any]:
    """from_pretrained kwargs for peft=qlora: a bitsandbytes 4-bit base placed whole on this rank's GPU."""
    if run.peft.method != PeftMethod.qlora:
        return {}

    dtype = getattr(torch, run.model.dtype.value)
    # One full copy of the base per rank (DDP): the GPU of this local rank, or the only one a launcher left visible.
    device = int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1)
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=run.peft.quant_type.value,
            bnb_4bit_use_double_quant=run.peft.double_quant,
            bnb_4bit_compute_dtype=dtype,
        ),
        "device_map": {"": device},
    }


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total), each shared (tied) tensor once; right for 4-bit bases and ZeRO-3 partitions too."""
    if hasattr(model, "get_nb_trainable_parameters"):  # a PeftModel: knows packed 4-bit weights and ds_numel
        return tuple(int(x) for x in model.get_nb_trainable_parameters())  # type: ignore[return-value]
    trainable = total = 0
    for prm in model.parameters():
        n = getattr(prm, "ds_numel", 0) or prm.numel()
        total += n
        trainable += n if prm.requires_grad else 0
    return trainable, total


def check_model_loads(run: RunConfig) -> None:
    """Load the tokenizer (with its chat template) and the model's config once, before anything is written, and turn
    what fails into an error naming model.name_or_path and the fix: a local folder that does not exist, a hub id that
    cannot be reached or is not cached while offline, a broken config, no chat template where one is needed."""
    m = run.model
    where = f"model.name_or_path: '{m.name_or_path}'"
    looks_local = m.name_or_path.startswith(("/", ".", "~")) or os.sep in m.name_or_path.strip("/").split("/", 1)[-1]
    if looks_local and not os.path.exists(os.path.expanduser(m.name_or_path)):
        raise ConfigError(f"{where} is not a folder that exists. Point it at a from_pretrained folder or a hub id")
    try:
        build_tokenizer(run)
        AutoConfig.from_pretrained(m.name_or_path, revision=m.revision, trust_remote_code=m.trust_remote_code)
    except (TemplateError, ConfigError):
        raise
    except OSError as e:
        if os.path.isdir(os.path.expanduser(m.name_or_path)):
            raise ConfigError(
                f"{where}: its config or tokenizer files cannot be read ({' '.join(str(e).split())[:200]}). "
                "Check config.json / tokenizer files there (or save the model again with save_pretrained)"
            ) from None
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        fix = (
            "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache: download it once online "
            "(huggingface-cli download <id>), point HF_HOME at a cache that has it, or use a local folder"
            if offline
            else "Check the id and revision (private models need HF_TOKEN in the environment), or use a local folder"
        )
        raise ConfigError(f"{where} could not be loaded ({' '.join(str(e).split())[:200]}). {fix}") from None
    except (ValueError, KeyError, TypeError) as e:  # a config.json / tokenizer file transformers cannot read
        raise ConfigError(
            f"{where}: its config or tokenizer files cannot be read ({' '.join(str(e).split())[:200]}). "
            "Check config.json / tokenizer_config.json there (or re-download the model)"
        ) from None
