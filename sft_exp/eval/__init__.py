"""Evaluation beyond the loss: the model writes held-out assistant turns, scored per source and reasoning mode
(generation eval), and benchmarks through lm-evaluation-harness.

    scorers.py   built-in scorers, plug-ins, mode compliance, aggregation, the gen/... sweep objective (no torch:
                 the config's validate imports it)
    generate.py  held-out rows -> prompts -> batched greedy generation -> results (eval_generate.json)
    hooks.py     inside a training run: before training, every N steps, after training (sft_exp.train.loop)
    harness.py   eval.harness: EleutherAI's lm-evaluation-harness on the final model (lm-eval, an optional extra)
    objective.py what a sweep optimises and compare ranks by: an eval loss, gen/... or harness/...
    saved.py     a saved run or checkpoint: its config, tokenizer and model, loaded

The command-line tools are sft_exp.evaluate (a saved run or checkpoint, no training) and sft_exp.chat.
"""
