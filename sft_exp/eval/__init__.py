"""Generation-based evaluation: the model writes held-out assistant turns, scored per source and reasoning mode.

    scorers.py   built-in scorers, plug-ins, mode compliance, aggregation, the gen/... sweep objective (no torch:
                 the config's validate imports it)
    generate.py  held-out rows -> prompts -> batched greedy generation -> results (eval_generate.json)
    hooks.py     inside a training run: before training, every N steps, after training (sft_exp.train.loop)

The command-line tools are sft_exp.evaluate (a saved run or checkpoint, no training) and sft_exp.chat.
"""
