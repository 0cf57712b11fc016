"""peft=lora|qlora: the config group, the refusals, and a real LoRA run on the tiny default (trains, touches only the
adapter, reloads from the run directory as adapter and as merged model with the logits of the model in memory, and
resumes from a checkpoint to the same adapter)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sft_exp.config import QLORA_NO_CUDA, ConfigError, to_run_config, validate
from sft_exp.train.peft import LLAMA_PROJECTIONS, default_target_modules
from tests.conftest import compose, launch


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------------------ config, no model
def test_default_is_full_fine_tuning() -> None:
    run = to_run_config(compose())
    assert run.peft.method.value == "none"
    validate(run)


def test_lora_composes_with_sweepable_keys() -> None:
    run = to_run_config(compose(["peft=lora", "peft.r=4", "peft.alpha=8", "peft.target_modules=[q_proj,v_proj]"]))
    validate(run)
    assert (run.peft.method.value, run.peft.r, run.peft.alpha) == ("lora", 4, 8)
    assert run.peft.target_modules == ["q_proj", "v_proj"]


def test_default_targets_per_architecture() -> None:
    assert default_target_modules("smollm3") == LLAMA_PROJECTIONS == default_target_modules("llama")
    assert set(LLAMA_PROJECTIONS) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert default_target_modules("gpt2") == "all-linear"  # peft's: every linear layer but the LM head


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["peft.r=8"], "peft.r: is set but peft.method=none does not use it"),
        (["peft=lora", "peft.quant_type=fp4"], "peft.quant_type: is set but peft.method=lora"),
        (["peft=lora", "peft.r=0"], "peft.r: must be >= 1"),
        (["peft=lora", "peft.dropout=1.5"], "peft.dropout: must be in [0, 1)"),
        (["peft=lora", "peft.target_modules=[lm_head]"], "peft.target_modules: contains lm_head"),
        (["peft=lora", "peft.target_modules=[]"], "peft.target_modules: is an empty list"),
        (["peft=lora", "+peft.extra.use_rsloraa=true"], "peft.extra.use_rsloraa: is not a field of peft.LoraConfig"),
        (["peft=lora", "+peft.extra.lora_alpha=8"], "peft.extra.lora_alpha: is set by sft-exp"),
    ],
)
def test_bad_peft_settings_fail_validation(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate(to_run_config(compose(overrides)))
    assert needle in str(e.value)


@pytest.mark.skipif(_cuda(), reason="the refusal is for machines without CUDA")
def test_qlora_refuses_without_cuda_before_loading_anything(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        validate(to_run_config(compose(["peft=qlora"])))
    assert str(e.value) == QLORA_NO_CUDA
    r = launch(["peft=qlora", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "peft.method: qlora" in r.stderr and "needs a CUDA GPU" in r.stderr and "peft=lora" in r.stderr
    # refused before the run was frozen, data prepared or a model loaded (Hydra has made only its own folder)
    assert not (tmp_path / "run/run_config.yaml").exists() and not list(tmp_path.rglob("*.safetensors"))


# ------------------------------------------------------------------------------------------------ a real LoRA run
def _train(tmp_path: Path, name: str, overrides: list[str], monkeypatch: pytest.MonkeyPatch, **kw) -> tuple:
    """The real run path in this process (freeze -> sft_exp.run.execute), keeping the model it trained."""
    import sft_exp.train.model
    from sft_exp.config.frozen import freeze
    from sft_exp.run import execute, prepare

    run_dir = tmp_path / name
    run = to_run_config(compose(overrides))
    validate(run)
    freeze(run, run_dir, overrides)
    if "prepared" not in kw:
        kw["prepared"] = prepare(run, run_dir)
    built: dict = {}
    real_build = sft_exp.train.model.build_model

    def keep(run_cfg, tokenizer):  # noqa: ANN001, ANN202
        built["model"] = real_build(run_cfg, tokenizer)
        built["before"] = {n: p.detach().clone() for n, p in built["model"].named_parameters()}
        return built["model"]

    monkeypatch.setattr(sft_exp.train.model, "build_model", keep)
    metrics = execute(run_dir, **kw)
    return run_dir, metrics, {**built, "prepared": kw["prepared"]}


@pytest.mark.slow
def test_lora_run_trains_adapter_only_reloads_and_resumes(
    tmp_path: Path, shared_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import torch
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    overrides = [
        f"cache_dir={shared_cache}",
        "peft=lora",
        "peft.merge=true",
        "train.learning_rate=2e-2",
        "train.max_steps=12",
        "train.gradient_accumulation_steps=1",
        "train.warmup_ratio=0",
        "train.logging_steps=4",
        "train.save_strategy=steps",
        "train.save_steps=6",
        "mixture.test_split_size=2",
        "packing.max_length=512",
    ]
    run_dir, m, built = _train(tmp_path, "run", overrides, monkeypatch)
    model = built["model"]  # get_peft_model injected the adapter into this very object: the trained model

    # it trains: the eval loss (over all sources; each source is evaluated on its own too) drops
    before, after = m["eval_loss_before"], m["eval_loss_after"]
    assert set(after) == set(before) and len(after) > 2
    assert after["all"] < before["all"] - 0.1, (before, after)
    # parameters: the adapter's (r x (in + out) per target projection), of the whole
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * 7 * model.config.num_hidden_layers
    n_lora = sum(p.numel() for p in lora.values())
    n_base = sum(p.numel() for p in built["before"].values())
    assert (m["trainable_parameters"], m["total_parameters"]) == (n_lora, n_base + n_lora)
    assert f"parameters: {n_lora:,} trainable of {n_base + n_lora:,}" in capsys.readouterr().out
    print(f"\nLoRA eval loss (all): {before['all']:.4f} -> {after['all']:.4f}; params {n_lora:,} / {n_base + n_lora:,}")
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["trainable_parameters"] == n_lora and saved["peft"]["method"] == "lora"
    assert saved["peft"]["target_modules"] == sorted(LLAMA_PROJECTIONS)
    assert saved["peft"]["merged_dir"] == str(run_dir / "merged")

    # only adapter weights changed: every base weight is bitwise what it was; every lora_B left its zero init
    after_params = dict(model.named_parameters())
    for name, old in built["before"].items():
        new = after_params.get(name, after_params.get(name.replace(".weight", ".base_layer.weight")))
        assert not new.requires_grad and torch.equal(new, old), name
    assert all(p.requires_grad for p in lora.values())
    assert all(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)

    # the adapter and the merged model reload from the run directory with the same logits (float32, no cache)
    x = torch.randint(0, model.config.vocab_size, (1, 96), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=x, use_cache=False).logits
        adapter = AutoPeftModelForCausalLM.from_pretrained(run_dir, dtype=torch.float32).eval()
        merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32).eval()
        d_adapter = (adapter(input_ids=x, use_cache=False).logits - ref).abs().max().item()
        d_merged = (merged(input_ids=x, use_cache=False).logits - ref).abs().max().item()
    print(f"max |logit diff|: adapter {d_adapter:.2e}, merged {d_merged:.2e}")
    assert d_adapter <= 1e-5 and d_merged <= 1e-5
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert merged.config.eos_token_id == model.config.eos_token_id

    # resume from the mid-run checkpoint (adapter + optimizer + scheduler + RNG) ends on the same adapter
    ckpt = run_dir / "checkpoint-6"
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    # (merge and eval do not change what is trained; skipped to keep the test short)
    quick = [o for o in overrides if o != "peft.merge=true"] + ["eval_before_train=false"]
    resumed_dir, _, _ = _train(tmp_path, "resumed", quick, monkeypatch, resume_from=ckpt, prepared=built["prepared"])
    a, b = load_file(run_dir / "adapter_model.safetensors"), load_file(resumed_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ no trainer needed
def _tiny(tmp_path: Path, overrides: list[str]) -> tuple:
    from sft_exp.train.model import build_model, build_tokenizer

    run = to_run_config(compose(overrides))
    validate(run)
    tok = build_tokenizer(run)
    return run, tok, build_model(run, tok)


def test_base_is_saved_only_when_the_model_cannot_be_reloaded(tmp_path: Path) -> None:
    from sft_exp.train.peft import setup

    run, tok, model = _tiny(tmp_path, ["peft=lora"])  # model.init=random: no weights to reload from
    a = setup(run, model, tok, tmp_path / "r1")
    assert a.base_ref == str((tmp_path / "r1/base").resolve()) and (tmp_path / "r1/base/model.safetensors").exists()
    assert a.config.target_modules == set(LLAMA_PROJECTIONS) and a.config.modules_to_save is None

    folder = tmp_path / "pretrained"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    run, tok, model = _tiny(tmp_path, ["peft=lora", f"model.name_or_path={folder}", "model.init=pretrained"])
    b = setup(run, model, tok, tmp_path / "r2")
    assert b.base_ref == str(folder.resolve()) and not (tmp_path / "r2/base").exists()

    run, tok, model = _tiny(tmp_path, [])
    assert setup(run, model, tok, tmp_path / "r3").config is None  # peft=none: full fine-tuning


def test_modules_to_save_keeps_tied_embeddings_tied_through_reload_and_merge(tmp_path: Path) -> None:
    """embed_tokens trained in full on a model whose LM head shares it: the adapter and the merged model both give
    back the trained model's logits (the tie is kept, not silently split)."""
    import torch
    from peft import AutoPeftModelForCausalLM, get_peft_model
    from transformers import AutoModelForCausalLM

    from sft_exp.train.peft import save_merged, setup

    run, tok, model = _tiny(tmp_path, ["peft=lora", "peft.r=4", "peft.modules_to_save=[embed_tokens]"])
    assert model.config.tie_word_embeddings
    a = setup(run, model, tok, tmp_path)
    assert a.config.ensure_weight_tying
    pm = get_peft_model(model, a.config)
    pm.peft_config["default"].base_model_name_or_path = a.base_ref
    with torch.no_grad():  # stand-in for training: move every trainable tensor
        g = torch.Generator().manual_seed(0)
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    base = pm.get_base_model()
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    pm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    save_merged(run, tmp_path, a.base_ref, None, tok)

    x = torch.randint(0, model.config.vocab_size, (1, 64), generator=g)
    with torch.no_grad():
        ref = pm.eval()(input_ids=x, use_cache=False).logits
        again = AutoPeftModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        assert (again(input_ids=x, use_cache=False).logits - ref).abs().max() <= 1e-5
        assert (merged(input_ids=x, use_cache=False).logits - ref).abs().max() <= 1e-5
