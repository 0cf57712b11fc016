"""sft-exp's entry point: compose (Hydra) -> validate -> freeze the run directory -> run it.

    python launch.py                                  # the embedded default: tiny SmolLM3 on the demo mixture
    python launch.py mode=prepare                     # build, tokenise and pack the mixture, print its table
    python launch.py --cfg job                        # print the composed config
    python launch.py -m train.learning_rate=1e-3,3e-3 # a sweep

Only this file and sft_exp/config.py know Hydra; everything below receives the frozen RunConfig.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sft_exp.config import ConfigError, RunConfig, register_configs, to_run_config, validate

register_configs()


def compose_and_validate(cfg: DictConfig) -> RunConfig:
    run = to_run_config(cfg)
    validate(run)
    return run


def freeze_run_dir(run: RunConfig) -> Path:
    from hydra.core.hydra_config import HydraConfig

    from sft_exp.rundir import freeze

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    freeze(run, run_dir, list(hc.overrides.task))
    return run_dir


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    started = time.time()
    try:
        run = compose_and_validate(cfg)
    except ConfigError as e:
        fail(str(e))
    run_dir = freeze_run_dir(run)
    print(f"run directory: {run_dir}", flush=True)

    from sft_exp.run import execute

    try:
        metrics = execute(run_dir, started)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        from sft_exp.data.sources import DataError

        if isinstance(e, (ConfigError, DataError, FileNotFoundError)) or str(e).startswith("template"):
            fail(str(e))
        raise
    after = metrics.get("eval_loss_after", {}) if isinstance(metrics, dict) else {}
    return after.get("all")  # the sweeper's objective


if __name__ == "__main__":
    main()
