"""Time the generation eval: 32 held-out rows x the 6 demo sources, batched greedy generation with the tiny model.

    python bench/bench_generate.py                          # a random-init tiny model: never stops, the worst case
    python bench/bench_generate.py --run outputs/runs/...   # a trained run's model (stops early: the usual case)
    python bench/bench_generate.py --batch-size 8 16 32 64 --repeat 2

Prints, per batch size: turns, new tokens, seconds (prompt building, generation, scoring), new tokens/s, rows/s.
Device: cuda when available (--device cpu forces the CPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, help="a trained run directory (default: a random-init tiny model)")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[64])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--device")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    a = ap.parse_args()

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from sft_exp.eval.generate import GenerationEval

    t0 = time.perf_counter()
    if a.run is not None:
        from sft_exp.eval.saved import load_trained

        run, tok, model, _, _ = load_trained(a.run, a.device)
    else:
        from hydra import compose, initialize_config_dir

        from sft_exp.config import to_run_config
        from sft_exp.config.hydra_glue import register_configs
        from sft_exp.train.model import build_model, build_tokenizer

        register_configs()
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            run = to_run_config(compose(config_name="config", overrides=["model.init=random"]))
        tok = build_tokenizer(run)
        model = build_model(run, tok).to(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run.eval.generate.rows = a.rows
    run.eval.generate.max_new_tokens = a.max_new_tokens
    t1 = time.perf_counter()
    gen = GenerationEval.from_run(run, tok)
    gen.prompt_ids(tok)
    t2 = time.perf_counter()
    device = next(model.parameters()).device
    print(
        f"model {a.run or 'tiny (random init)'} on {device}, torch threads {torch.get_num_threads()}; "
        f"load {t1 - t0:.1f} s, prompts built and tokenised {t2 - t1:.2f} s"
    )
    print("batch  turns  new_tokens  seconds  new_tok/s  rows/s  stops")
    for bs in a.batch_size:
        gen.batch_size = bs
        for _ in range(a.repeat):
            t = time.perf_counter()
            res = gen.run(model, tok)
            dt = time.perf_counter() - t
            rows = sum(s.rows for s in gen.sources)
            print(
                f"{bs:5d}  {res['prompts']:5d}  {res['new_tokens']:10d}  {dt:7.2f}  {res['new_tokens'] / dt:9.0f}  "
                f"{rows / dt:6.1f}  {res['all']['stops']:.3f}"
            )


if __name__ == "__main__":
    main()
