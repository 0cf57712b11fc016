"""A Slurm task of a run submitted through Hydra's submitit launcher (launcher=slurm, or hydra/launcher=submitit_slurm).

Every task of the job is one rank: rank, local rank, world size and the master address come from
submitit.JobEnvironment, and the task joins the process group itself (no torchrun or accelerate launch inside).

Order inside a job, so that no rank waits on a collective timeout while another works alone:
1. rank 0 settles the run directory (new, resumed, or this job's own after a requeue), prepares the data once and
   writes a ready file (per job and restart) into the job's submitit folder; the other ranks poll for that file;
2. every rank joins the process group and trains.

Preemption and time limits: Slurm sends USR2 `signal_delay_s` before the time limit (submitit asks for it); SIGTERM
comes with preemption, `scontrol requeue` and scancel. Either way the ranks save a checkpoint together at the end of
the step. After USR2, rank 0 then hands over to submitit's own handler, which calls the launcher's `checkpoint()`
(a DelayedSubmission of the same job) and requeues it; after SIGTERM Slurm itself requeues (or cancels) the job.
The requeued job has the same id, lands in the same run directory (Hydra's sweep dir is fixed in the pickled
launcher), finds its id in attempts.json and continues from the last complete checkpoint, with the same data order.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sft_exp.checkpoints import SaveFailed
from sft_exp.compat import submitit_timeout_signal
from sft_exp.config import ConfigError, RunConfig
from sft_exp.errors import Interrupted
from sft_exp.io import write_json
from sft_exp.launch.job import HydraJob
from sft_exp.launch.report import console_copied_to, final_summary
from sft_exp.launch.resume import open_run_dir
from sft_exp.rundir import RunDir
from sft_exp.train.callbacks.stop_on_signal import STOP

POLL_S = 1.0


def master_port(job_id: str) -> int:
    """A port every task derives alike from the job id (they cannot agree on a free one before they meet)."""
    return 20000 + int("".join(ch for ch in job_id if ch.isdigit()) or "0") % 20000


def run_task(run: RunConfig, job: HydraJob, freeze: Callable[[], Path], started: float) -> dict[str, Any]:
    import submitit

    from sft_exp.config.preflight import check_devices, cpu_cores

    env = submitit.JobEnvironment()
    d = run.distributed
    world = d.nodes * d.processes_per_node
    if env.num_tasks != world or env.num_nodes != d.nodes:
        raise ConfigError(
            f"distributed: the Slurm job has {env.num_nodes} node(s) x {env.num_tasks // env.num_nodes} task(s) but "
            f"distributed.nodes={d.nodes} x processes_per_node={d.processes_per_node}. Use launcher=slurm (it takes "
            "nodes and tasks per node from distributed.*) or set hydra.launcher.nodes/tasks_per_node to match"
        )
    per_node = env.num_tasks // env.num_nodes
    os.environ.update(
        RANK=str(env.global_rank),
        LOCAL_RANK=str(env.local_rank),
        WORLD_SIZE=str(env.num_tasks),
        LOCAL_WORLD_SIZE=str(per_node),
        MASTER_ADDR="127.0.0.1" if env.num_nodes == 1 else env.hostnames[0],
        MASTER_PORT=str(d.master_port or master_port(env.raw_job_id)),
    )
    # Where this task runs and whom it joins, in its own log (.../.submitit/<job>/<job>_<rank>_log.out).
    node_name = os.environ.get("SLURMD_NODENAME", env.hostname)
    print(
        f"slurm task: rank {env.global_rank} of {env.num_tasks} on node {node_name}"
        f" (node rank {env.node} of {env.num_nodes}, local rank {env.local_rank} of {per_node});"
        f" master {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
        flush=True,
    )
    # Threads per task: the allocation's (Slurm), else hydra.launcher.cpus_per_task (submitit_local, whose jobs all
    # run at once on this host), else the node's cores shared by its tasks. Set in torch too: it is imported already.
    cpus = os.environ.get("SLURM_CPUS_PER_TASK") or (str(job.cpus_per_task) if job.cpus_per_task else None)
    os.environ.setdefault("OMP_NUM_THREADS", cpus or str(max(1, cpu_cores() // per_node)))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    print(f"slurm task: {torch.get_num_threads()} torch thread(s)", flush=True)
    check_devices(run, per_node)

    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    attempt = f"{env.job_id}#{restart}"
    ready = env.paths.folder / f"{env.job_id}_sft_exp_ready.json"
    prepared = None
    if env.global_rank == 0:
        try:
            run_dir, resume_from = open_run_dir(run, job, freeze, slurm_job_id=env.job_id)
            print(f"run directory: {run_dir}", flush=True)
            if world > 1:
                from sft_exp.config.frozen import load_frozen
                from sft_exp.run import prepare

                prepared = prepare(load_frozen(run_dir), run_dir)
            write_json(ready, {"attempt": attempt, "run_dir": str(run_dir), "resume_from": _str(resume_from)})
        except BaseException as e:
            write_json(ready, {"attempt": attempt, "error": f"{type(e).__name__}: {e}"})
            raise
    else:
        info = _wait_ready(ready, attempt)
        run_dir, resume_from = Path(info["run_dir"]), _path(info["resume_from"])

    # The pre-timeout signal also stops training at a step end; submitit's own handler for it (checkpoint() +
    # requeue) runs afterwards, from rank 0, once the checkpoint is on disk.
    submitit_usr2 = signal.getsignal(submitit_timeout_signal(env))
    STOP.signums = (*STOP.signums, submitit_timeout_signal(env))
    from sft_exp.launch.ranks import run_rank

    try:
        # A one-task job prepares in run_rank (rank 0 reports); with several tasks rank 0 prepared above.
        if env.global_rank != 0:
            return run_rank(run_dir, resume_from, started, prepared=prepared, report=world == 1)
        with console_copied_to(RunDir(run_dir).console_log):  # rank 0's output, also in <run dir>/train.log
            result = run_rank(run_dir, resume_from, started, prepared=prepared, report=world == 1)
            print(final_summary(run, run_dir, result, job), flush=True)
        return result
    except SaveFailed as e:
        from sft_exp.launch.local import resume_command

        # The command that resumes it: this job's overrides (launcher=slurm among them: it is submitted again).
        e.command = e.command or resume_command(run_dir, job)
        raise
    except Interrupted as e:
        print(f"[rank {env.global_rank}] {e}", flush=True)
        if e.signum == submitit_timeout_signal(env):
            if env.global_rank == 0 and callable(submitit_usr2):
                submitit_usr2(e.signum, None)  # checkpoint() -> DelayedSubmission, scontrol requeue, exit
            # The other ranks leave quietly (exit 0): a failing task would make srun end rank 0 before it requeues.
            raise SystemExit(0) from None
        # SystemExit, not an exception: submitit then writes no result, so the job does not look done while Slurm
        # requeues it.
        raise SystemExit(e.exit_code) from None


def _str(p: Path | None) -> str | None:
    return str(p) if p is not None else None


def _path(s: str | None) -> Path | None:
    return Path(s) if s else None


def _wait_ready(ready: Path, attempt: str) -> dict[str, Any]:
    """Poll for rank 0's ready file of this attempt (rank 0 may tokenise for a long time: no timeout here; if rank 0
    dies, srun ends this task, see SLURM_KILL_BAD_EXIT in conf/launcher/slurm.yaml)."""
    while True:
        try:
            info = json.loads(ready.read_text())
        except (OSError, ValueError):
            info = {}
        if info.get("attempt") == attempt:
            if "error" in info:
                raise RuntimeError(f"rank 0 failed before training: {info['error']}")
            return info
        time.sleep(POLL_S)
