"""Training throughput of the SmolLM3-3B architecture on packed rows, on one GPU; prints a Markdown table.

    python bench/gpu_throughput.py                     # the full table on one H100 / H200 (~4 min after setup)
    python bench/gpu_throughput.py --tiny --device cpu # the same code path with a tiny model, as a smoke check

What runs: the SmolLM3-3B architecture initialised from its config (no download; random weights, bf16 parameters,
AdamW), one packed row per step (padding-free: the row holds sequences laid end to end and `position_ids` restart at
every sequence, as sft-exp's collator builds them), for every combination asked of
  * row length: 8k, 16k, 64k tokens;
  * attention: `varlen` (PyTorch's FlashAttention-2 varlen kernel, sft_exp/train/attention.py), `flash_attention_2`
    (when the flash-attn package is installed), `sdpa` (transformers' block-diagonal dense mask for packed rows);
  * kernels and LM head (`--kernels`): `hf` (plain transformers: [tokens x 128k] logits, then cross-entropy), `trl`
    (TRL's chunked fused LM head: per-token log-probs without the full logits; what sft-exp trains with, since
    TRL 1.16 patches it in), `liger_trl` (liger's RMSNorm/SwiGLU/RoPE kernels + TRL's fused head: sft-exp with
    train.use_liger_kernel=true), `liger` (liger's kernels + its fused linear cross-entropy: plain TRL-less liger);
  * gradient checkpointing on / off.
The rows are filled first-fit-decreasing from sequence lengths drawn like the SmolLM3 SFT mixture (bench/data: each
SmolTalk2 split's rows x recipe weight, lognormal around its mean length; longer ones are cut at the row length).

Columns: non-pad tokens/s per GPU (tokens in the row, all of them real: padding-free rows have no pad), model FLOPs
utilisation (MFU) and peak allocated memory. MFU = model FLOPs per step / step time / peak, where
  model FLOPs = 6 * N * tokens  +  6 * n_layers * d_attn * sum_over_sequences s * (s + 1)
N counts every parameter once (the tied embedding is the LM head's matmul), the second term is causal attention over
each sequence alone (QK^T and AV: 2 * 2 * d_attn per query-key pair, forward + backward = 3x, s(s+1)/2 pairs); the
recomputation that gradient checkpointing adds is not counted (it is the hardware's work, not the model's). The peak
is the card's dense bf16 datasheet figure (H100/H200 SXM: 989 TFLOP/s); the bench also measures a plain bf16 matmul on
the card and prints MFU against that ceiling. Target (issue 9): >= 16k non-pad tokens/s and >= 40% MFU at 64k rows
on one H100.
"""

from __future__ import annotations

import argparse
import csv
import gc
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TSV = REPO / "bench" / "data" / "smoltalk2_sft_split_stats.tsv"

TARGET_TOKENS_PER_S, TARGET_MFU = 16_000, 0.40


# ------------------------------------------------------------------------------------------------------ rows
def mixture_lengths(n: int, seed: int = 0, sigma: float = 1.0) -> np.ndarray:
    """n sequence lengths drawn like the SmolLM3 SFT mixture (split shares = rows x recipe weight)."""
    with open(TSV, newline="") as f:
        splits = list(csv.DictReader(f, delimiter="\t"))
    share = np.array([int(s["rows"]) * float(s["recipe_weight"]) for s in splits])
    rng = np.random.default_rng(seed)
    which = rng.choice(len(splits), size=n, p=share / share.sum())
    means = np.array([float(s["mean_tokens_per_row"]) for s in splits])[which]
    mu = np.log(means) - sigma**2 / 2  # lognormal mean = exp(mu + sigma^2 / 2)
    return np.clip(np.rint(rng.lognormal(mu, sigma)), 16, None).astype(np.int64)


def packed_rows(capacity: int, n_rows: int, seed: int = 0) -> list[list[int]]:
    """The n_rows fullest rows of a first-fit-decreasing packing of enough mixture-shaped sequences."""
    need = n_rows * 3
    lengths = np.minimum(mixture_lengths(max(64, int(need * capacity / 900)), seed), capacity)
    bins: list[list[int]] = []
    free: list[int] = []
    for s in sorted(lengths.tolist(), reverse=True):
        for i, room in enumerate(free):
            if s <= room:
                bins[i].append(s)
                free[i] -= s
                break
        else:
            bins.append([s])
            free.append(capacity - s)
    bins.sort(key=sum, reverse=True)
    return bins[:n_rows]


def row_tensors(seqs: list[int], vocab: int, device: str, seed: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    total = sum(seqs)
    ids = torch.randint(16, vocab, (1, total), generator=g)
    pos = torch.cat([torch.arange(s) for s in seqs]).unsqueeze(0)
    labels = ids.clone()
    labels[0, torch.as_tensor(np.cumsum([0, *seqs[:-1]]))] = -100  # a sequence's first token follows nothing
    return {"input_ids": ids.to(device), "position_ids": pos.to(device), "labels": labels.to(device)}


# ------------------------------------------------------------------------------------------------------ model
def model_config(tiny: bool) -> Any:
    from transformers import SmolLM3Config

    if tiny:
        sizes = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4)
        sizes |= dict(num_attention_heads=4, num_key_value_heads=2)
    else:  # HuggingFaceTB/SmolLM3-3B's config.json
        sizes = dict(vocab_size=128256, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36)
        sizes |= dict(num_attention_heads=16, num_key_value_heads=4)
    return SmolLM3Config(
        **sizes,
        max_position_embeddings=65536,
        rope_parameters={"rope_theta": 5_000_000.0, "rope_type": "default"},
        tie_word_embeddings=True,
        use_cache=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )


def model_flops(n_params: int, cfg: Any, seqs: list[int]) -> float:
    from sft_exp.train.tracking import attention_width, train_flops

    pairs = sum(s * (s + 1) for s in seqs)
    return train_flops(n_params, cfg.num_hidden_layers, attention_width(cfg), sum(seqs), pairs)


def matmul_tflops(device: str) -> float | None:
    """Measured dense bf16 matmul rate of this card (8192^3, mean of 10 after 3 warm-ups)."""
    import torch

    if device != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12


def kib(n: int) -> str:
    return f"{n / 1024:g}k"


@dataclass
class Case:
    length: int
    attn: str
    head: str  # hf | trl | liger_trl | liger
    gc: bool

    @property
    def label(self) -> str:
        return f"{kib(self.length)} {self.attn} {self.head} gc={'on' if self.gc else 'off'}"


def patch(model: Any, head: str, done: set[str]) -> None:
    """Patch the model for `head`, in the order of HEADS (each patch stays: liger cannot be undone)."""
    if "trl" in head and "trl" not in done:  # a wrapper: used only when called with fused_lm_head=True
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer asks for
        done.add("trl")
    if "liger" in head and "liger_layers" not in done:
        from liger_kernel.transformers import apply_liger_kernel_to_smollm3

        apply_liger_kernel_to_smollm3(model=model, fused_linear_cross_entropy=False)
        done.add("liger_layers")
    if head == "liger" and "liger_flce" not in done:  # replaces model.forward: the TRL head is gone from here on
        from liger_kernel.transformers import apply_liger_kernel_to_smollm3

        apply_liger_kernel_to_smollm3(
            model=model, rope=False, rms_norm=False, swiglu=False, fused_linear_cross_entropy=True
        )
        done.add("liger_flce")


def run_case(model: Any, case: Case, rows: list[dict[str, Any]], seqs: list[list[int]], args: Any) -> dict[str, Any]:
    import torch

    cuda = args.device == "cuda"
    model.set_attn_implementation(case.attn)
    with warnings.catch_warnings():  # transformers 5.2x renames it activation_checkpointing_*; 5.1x has only this
        warnings.simplefilter("ignore", FutureWarning)
        if case.gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    fused = {"fused_lm_head": True} if "trl" in case.head else {}

    def step(i: int) -> float:
        out = model(**rows[i % len(rows)], use_cache=False, **fused)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    try:
        t0 = time.perf_counter()
        for i in range(args.warmup):
            step(i)
        if cuda:
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        steps = args.steps if first < args.slow_step_s else 1  # a very slow case is timed on one step
        t0 = time.perf_counter()
        loss = 0.0
        for i in range(args.warmup, args.warmup + steps):
            loss = step(i)
        if cuda:
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
    except torch.cuda.OutOfMemoryError:
        return {"error": "out of memory"}
    finally:
        opt.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
    used = [seqs[i % len(seqs)] for i in range(args.warmup, args.warmup + steps)]
    tokens = sum(sum(s) for s in used) / steps
    flops = sum(model_flops(args.n_params, model.config, s) for s in used) / steps
    return {
        "tokens_per_s": tokens / dt,
        "step_s": dt,
        "tflops": flops / dt / 1e12,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "loss": loss,
        "steps": steps,
    }


HEADS = ("hf", "trl", "liger_trl", "liger")  # the order they run in: liger patches the model in place, for good


def cases(args: Any, attns: list[str], heads: list[str]) -> list[Case]:
    out = []
    for head in sorted(heads, key=HEADS.index):
        for length in args.lengths:
            for attn in attns:
                if attn == "sdpa" and (length > args.sdpa_max_length or head not in ("hf", "trl")):
                    continue  # dense [L x L] mask: at 64k about 50x the varlen step, minutes per step
                no_gc = length <= args.no_gc_max_length and attn != "sdpa" and head in ("hf", "liger_trl")
                out.extend(Case(length, attn, head, gc) for gc in ([True, False] if no_gc else [True]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[8192, 16384, 65536])
    ap.add_argument("--attn", default="varlen,flash_attention_2,sdpa", help="comma list; missing kernels skipped")
    ap.add_argument("--kernels", default=",".join(HEADS), help=f"comma list of {', '.join(HEADS)}")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per case")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--slow-step-s", type=float, default=20.0, help="time only one step when warm-up took longer")
    ap.add_argument("--sdpa-max-length", type=int, default=16384, help="skip sdpa above this row length")
    ap.add_argument("--no-gc-max-length", type=int, default=8192, help="also run without checkpointing up to here")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip the remaining cases after this long")
    ap.add_argument("--tiny", action="store_true", help="a 4-layer model (smoke check of the code path)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM

    from sft_exp.train.attention import available as varlen_available
    from sft_exp.train.attention import register
    from sft_exp.train.tracking import peak_tflops

    started = time.perf_counter()
    register()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no GPU; use --tiny --device cpu for a smoke check")
    attns = []
    for a in args.attn.split(","):
        if a == "varlen" and (not cuda or not varlen_available()):
            print(f"skip attn=varlen: {'no CUDA' if not cuda else 'torch has no torch.nn.attention.varlen'}")
        elif a == "flash_attention_2" and (not cuda or importlib.util.find_spec("flash_attn") is None):
            print("skip attn=flash_attention_2: the flash-attn package is not installed")
        else:
            attns.append(a)
    heads = [h for h in args.kernels.split(",") if h]
    if unknown := set(heads) - set(HEADS):
        sys.exit(f"error: --kernels: unknown {sorted(unknown)}; use a comma list of {', '.join(HEADS)}")
    if any("liger" in h for h in heads) and (not cuda or importlib.util.find_spec("liger_kernel") is None):
        print("skip liger kernels: " + ("liger-kernel is not installed" if cuda else "no CUDA"))
        heads = [h for h in heads if "liger" not in h]
    if any("trl" in h for h in heads) and importlib.util.find_spec("trl") is None:
        print("skip TRL's fused LM head: trl is not installed")
        heads = [h for h in heads if "trl" not in h]

    cfg = model_config(args.tiny)
    torch.manual_seed(0)
    dtype = torch.bfloat16
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.train()
    args.n_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = peak_tflops(None) if cuda else None  # the card's dense bf16 datasheet figure (sft_exp.train.tracking)
    measured = matmul_tflops(args.device)
    print(
        f"# gpu_throughput: {name}, torch {torch.__version__}, model {cfg.num_hidden_layers} layers "
        f"{args.n_params / 1e9:.2f}B params, bf16; datasheet peak {peak} TFLOP/s, measured bf16 matmul "
        f"{measured and round(measured)} TFLOP/s; setup {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    rows = {n: packed_rows(n, args.warmup + args.steps) for n in args.lengths}
    tensors = {n: [row_tensors(r, cfg.vocab_size, args.device, i) for i, r in enumerate(rows[n])] for n in rows}
    for n, rs in rows.items():
        fill = sum(map(sum, rs)) / (n * len(rs))
        print(f"rows of {n}: {np.mean([len(r) for r in rs]):.0f} sequences per row, {fill:.2%} filled", flush=True)

    print(
        "\n| row | attention | kernels / LM head | grad ckpt | non-pad tok/s | step s | TFLOP/s | MFU (datasheet) |"
        " MFU (measured matmul) | peak GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    patched: set[str] = set()
    results: list[tuple[Case, dict[str, Any]]] = []
    for case in cases(args, attns, heads):
        if time.perf_counter() - started > args.budget_s:
            print(
                f"| {kib(case.length)} | {case.attn} | {case.head} | "
                f"{'on' if case.gc else 'off'} | skipped: --budget-s {args.budget_s:.0f} reached | | | | | |"
            )
            continue
        patch(model, case.head, patched)
        r = run_case(model, case, tensors[case.length], rows[case.length], args)
        results.append((case, r))
        cells = [kib(case.length), case.attn, case.head, "on" if case.gc else "off"]
        if "error" in r:
            cells += [r["error"], "", "", "", "", ""]
        else:
            mfu = f"{r['tflops'] / peak:.1%}" if peak else "n/a"
            mfu_m = f"{r['tflops'] / measured:.1%}" if measured else "n/a"
            cells += [f"{r['tokens_per_s']:,.0f}", f"{r['step_s']:.3f}", f"{r['tflops']:.0f}", mfu, mfu_m]
            cells += [f"{r['peak_gib']:.1f}"]
        print("| " + " | ".join(cells) + " |", flush=True)

    best = [r for c, r in results if c.length == max(args.lengths) and "error" not in r]
    if best and peak:
        top = max(best, key=lambda r: r["tokens_per_s"])
        ok = top["tokens_per_s"] >= TARGET_TOKENS_PER_S and top["tflops"] / peak >= TARGET_MFU
        print(
            f"\nbest at {kib(max(args.lengths))}: {top['tokens_per_s']:,.0f} non-pad tokens/s, "
            f"MFU {top['tflops'] / peak:.1%} (target >= {TARGET_TOKENS_PER_S:,} and >= {TARGET_MFU:.0%} on an H100: "
            f"{'met' if ok else 'not met'}); total {time.perf_counter() - started:.0f} s"
        )
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
