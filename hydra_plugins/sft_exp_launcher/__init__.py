"""launcher=slurm's Hydra launcher: the submitit plugin's SlurmLauncher, with a job Slurm refuses reported as an error.

The plugin lets sbatch's refusal (a partition with fewer nodes than asked for, too many GPUs, a time limit over the
partition's, an unknown account, ...) surface as a traceback out of Hydra; here it becomes `error: ...` naming the
settings to check, exit 2, before anything ran. Used through `hydra.launcher._target_` in conf/launcher/slurm.yaml;
`hydra/launcher=submitit_slurm` on its own keeps the plugin's class.

Hydra instantiates launchers only from the `hydra_plugins` namespace package and imports every module in it at
startup, so this one stays small and imports nothing of sft_exp.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as PluginSlurmLauncher


def refusal(cmd: Any, stderr: str, params: dict[str, Any]) -> str | None:
    """The error to print when `cmd` was the sbatch call Slurm refused (None for any other failure)."""
    argv = cmd if isinstance(cmd, (list, tuple)) else str(cmd).split()
    if not argv or Path(str(argv[0])).name != "sbatch":
        return None
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    reason = lines[-1].removeprefix("sbatch: error: ") if lines else f"sbatch exited with an error: {stderr!r}"
    p = params.get("partition")
    where = f"launcher.partition={p} (`sinfo -p {p}` lists its nodes and limits)" if p else "the default partition"
    return (
        f"launcher: Slurm refused the job: {reason}. Nothing was submitted. Check what the job asks for against "
        f"{where}: {params.get('nodes')} node(s) x {params.get('tasks_per_node')} task(s) (distributed.nodes, "
        "distributed.processes_per_node), launcher.gpus_per_node, launcher.cpus_per_task, launcher.mem_gb, "
        "launcher.timeout_min, launcher.account, launcher.qos"
    )


class SlurmLauncher(PluginSlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[Any]:
        from submitit.core.utils import FailedJobError

        try:
            return super().launch(job_overrides, initial_job_idx)
        except FailedJobError as e:
            cause = e.__cause__
            msg = None
            if isinstance(cause, subprocess.CalledProcessError):
                msg = refusal(cause.cmd, str(cause.stderr or e), dict(self.params))
            if msg is None:
                raise
            print(f"error: {msg}", file=sys.stderr)
            raise SystemExit(2) from None
