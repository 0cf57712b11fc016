"""The Hydra side of a sweep: the callback that keeps <sweep dir>/sweep_index.json (conf/hydra/default.yaml:
hydra.callbacks.sweep_index) and what a job knows of its sweep (`describe_job`). The index itself:
sft_exp.tools.sweep_index."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import OmegaConf

from sft_exp.config.hydra_glue import register_configs
from sft_exp.io import read_json
from sft_exp.ranks import is_main_process
from sft_exp.tools.sweep_index import (
    INDEX,
    SweepIndex,
    final_metrics,
    format_index,
    group_name,
    load_index,
    parse_override,
    run_name,
)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def swept_keys(task_overrides: list[str], sweeper_params: dict[str, Any] | None) -> list[str]:
    """Keys a multirun varies: sweep syntax on the command line (a,b / range / interval / choice) + sweeper params."""
    keys: list[str] = []
    for o in OverridesParser.create().parse_overrides(list(task_overrides)):
        if o.is_sweep_override() and o.key_or_group not in keys:
            keys.append(o.key_or_group)
    for k in sweeper_params or {}:
        k = parse_override(f"{k}=")[0]
        if k not in keys:
            keys.append(k)
    return keys


def describe_job(hc: Any) -> dict[str, Any]:
    """In a Hydra job: {sweep_dir, job_num, name, swept {key: value}, overrides, group} (sweep_dir None: single run)."""
    overrides = [str(o) for o in hc.overrides.task]
    values = dict(parse_override(o) for o in overrides)
    if hc.mode != RunMode.MULTIRUN:
        return {"sweep_dir": None, "name": hc.job.override_dirname or "default", "swept": {}, "overrides": overrides}
    sweep_dir = Path(str(hc.sweep.dir)).resolve()
    header = read_json(sweep_dir / INDEX) or {}
    keys = header.get("swept")
    if keys is None:  # no callback ran in the launcher: the sweeper's params are all this process can see
        keys = swept_keys([], _params(hc.sweeper))
    swept = {k: values[k] for k in keys if k in values}
    return {
        "sweep_dir": str(sweep_dir),
        "job_num": int(hc.job.num),
        "name": run_name(swept, hc.job.override_dirname or f"job{hc.job.num}"),
        "group": group_name(sweep_dir),
        "swept": swept,
        "overrides": overrides,
    }


def _params(sweeper_cfg: Any) -> dict[str, Any]:
    params = sweeper_cfg.get("params") if sweeper_cfg is not None else None
    return OmegaConf.to_container(params) if params is not None else {}  # type: ignore[return-value]


class SweepIndexCallback(Callback):
    """Hydra callback (conf/config.yaml: hydra.callbacks.sweep_index) that keeps the index of a multirun.

    on_multirun_start and on_multirun_end run in the launching process; on_job_start and on_job_end run in each
    job's own process (for submitit/Slurm, on the node), so the index is complete however the jobs were launched.
    """

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        h = config.hydra
        sweep_dir = Path(str(h.sweep.dir)).resolve()
        task = [str(o) for o in h.overrides.task]
        keys = swept_keys(task, _params(h.sweeper))
        objective = str(config.get("sweep", {}).get("objective", "all"))
        sweeper = str(h.sweeper.get("_target_", "")).rsplit(".", 1)[-1]
        launcher = str(h.launcher.get("_target_", "")).rsplit(".", 1)[-1]
        command = " ".join(["python", Path(sys.argv[0]).name, *sys.argv[1:]])
        SweepIndex(sweep_dir).set_header(
            sweep_dir=str(sweep_dir),
            group=group_name(sweep_dir),
            command=command,
            sweeper=sweeper,
            launcher=launcher,
            overrides=task,
            params=_params(h.sweeper),
            swept=keys,
            objective=objective,
            status="running",
            started=_now(),
            launcher_host=socket.gethostname(),
            launcher_pid=os.getpid(),
        )

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        data = load_index(sweep_dir)
        failed = [k for k, e in data["runs"].items() if e.get("status") != "finished"]
        SweepIndex(sweep_dir).set_header(status="failed" if failed else "finished", ended=_now())
        print("\n" + format_index(load_index(sweep_dir)), flush=True)
        print(f"sweep index: {sweep_dir / INDEX}\ncompare:     python -m sft_exp.tools.compare {sweep_dir}", flush=True)

    def _is_sweep_job(self, config: Any) -> bool:
        return config.hydra.mode == RunMode.MULTIRUN and is_main_process()

    def on_job_start(self, config: Any, **kwargs: Any) -> None:
        if not self._is_sweep_job(config):
            return
        h = config.hydra
        run_dir = Path(str(h.runtime.output_dir))
        job = describe_job(h)
        SweepIndex(h.sweep.dir).record_run(
            run_dir,
            job_num=job["job_num"],
            name=job["name"],
            swept=job["swept"],
            overrides=job["overrides"],
            status="running",
            host=socket.gethostname(),
            pid=os.getpid(),
            slurm_job_id=os.environ.get("SLURM_JOB_ID"),
            started=_now(),
            ended=None,
            error=None,
        )

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        if not self._is_sweep_job(config):
            return
        h = config.hydra
        run_dir = Path(str(h.runtime.output_dir))
        objective = str(config.get("sweep", {}).get("objective", "all"))
        fields: dict[str, Any] = {"ended": _now()}
        if job_return.status == JobStatus.COMPLETED:
            fields.update(status="finished", final=final_metrics(run_dir, objective))
        else:
            err = getattr(job_return, "_return_value", None)
            fields.update(status="failed", error=f"{type(err).__name__}: {err}"[:2000])
        SweepIndex(h.sweep.dir).record_run(run_dir, **fields)


# A submitit worker unpickles SweepIndexCallback before it resolves its job's directory (${run_dirname:...}).
register_configs()
