"""Training through Slurm for real (the local cluster of scripts/slurm/up.sh), submitted by Hydra's submitit launcher.

- launcher=slurm with distributed=ddp: one job of 2 tasks, each task one rank (rank/world from submitit's
  JobEnvironment); `scontrol requeue` of the running job: it saves a checkpoint on SIGTERM, Slurm restarts it, and
  it continues in the same run directory from that checkpoint to the same losses as an uninterrupted run.
- launcher=slurm with distributed.nodes=2: one job of 2 nodes x 1 task on the cluster's two slurmd nodes (partition
  `multi`); node rank, local rank, world size and the master address (the first node's name) come from the
  allocation, and it trains to the same losses as 2 local ranks; lm-eval scores the model in the same job.
- -m hydra/launcher=submitit_slurm with sweep=mixture_random: a 2-run sweep (two drawn mixtures at one token budget),
  both runs finish with metrics, one Slurm job each.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from sft_exp.checkpoints import is_complete
from tests.conftest import PY, REPO, launch
from tests.test_distributed import ddp_reference, dist_args, losses

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

if shutil.which("sinfo") is None:
    pytest.skip("Slurm is not installed: run `bash scripts/slurm/up.sh` first", allow_module_level=True)


def _squeue_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
    return out.strip()


def test_ddp_job_requeued_mid_run_finishes_like_an_uninterrupted_run(tmp_path: Path, shared_cache: Path) -> None:
    want = losses(ddp_reference(shared_cache) / "trainer_state.json")
    sweep = tmp_path / "sweep"
    args = [a for a in dist_args(shared_cache, "unused") if not a.startswith("hydra.run.dir")]
    cmd = [PY, str(REPO / "launch.py"), "launcher=slurm", "launcher.partition=debug", "distributed=ddp", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [*cmd, f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    # Once the job has a complete checkpoint, requeue it while it runs (as a preemption would).
    deadline = time.monotonic() + 300
    while not any(is_complete(c) for c in sweep.glob("*/checkpoint-2")):
        assert proc.poll() is None, proc.communicate()[0].decode()[-4000:]
        assert time.monotonic() < deadline, "the job made no checkpoint in time"
        time.sleep(0.05)
    (job_dir,) = [p for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]
    job_id = job_dir.name
    assert _squeue_state(job_id) == "RUNNING"
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
    out, _ = proc.communicate(timeout=600)
    text = out.decode()
    assert proc.returncode == 0, text[-4000:]

    (run_dir,) = [p.parent for p in sweep.glob("*/run_config.yaml")]  # the requeued job wrote into the same one
    attempts = json.loads((run_dir / "attempts.json").read_text())
    assert [(a["slurm_job_id"], a["slurm_restart_count"]) for a in attempts] == [(job_id, 0), (job_id, 1)]
    resumed_from = attempts[1]["resumed_from"]
    assert resumed_from is not None and int(resumed_from.split("-")[1]) >= 2
    logs = (job_dir / f"{job_id}_0_log.out").read_text() + (job_dir / f"{job_id}_0_log.err").read_text()
    assert f"resuming {run_dir} from {resumed_from}" in logs
    # both tasks ran, as ranks 0 and 1 of one process group
    assert (job_dir / f"{job_id}_1_log.out").exists()
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["global_steps"] == 8 and m["resumed_from"] == resumed_from
    got = losses(run_dir / "trainer_state.json")
    assert sorted(got) == sorted(want)
    for step, loss in want.items():
        assert abs(got[step] - loss) <= 1e-6, (step, got[step], loss)


TASK_LINE = re.compile(
    r"slurm task: rank (\d+) of (\d+) on node (\S+) \(node rank (\d+) of (\d+), local rank (\d+) of (\d+)\);"
    r" master (\S+):(\d+)"
)


def test_two_node_ddp_job_trains_like_two_local_ranks(tmp_path: Path, shared_cache: Path) -> None:
    want = losses(ddp_reference(shared_cache) / "trainer_state.json")
    sweep = tmp_path / "sweep"
    args = [
        a
        for a in dist_args(shared_cache, "unused")
        if not a.startswith(("hydra.run.dir", "distributed.processes_per_node"))
    ]
    r = launch(
        [
            "launcher=slurm",
            "launcher.partition=multi",  # scripts/slurm/up.sh: both nodes (debug holds the first alone)
            "distributed=ddp",
            "distributed.nodes=2",
            "distributed.processes_per_node=1",
            # The two nodes share this machine's cores: one each (else each rank takes a thread per core of "its"
            # node, 4 threads on 2 cores, and training is ~5x slower).
            "launcher.cpus_per_task=1",
            # lm-eval after training, inside this job (issue #16): rank 0 scores while rank 1 has finished
            "eval.harness.tasks=[sftexp_arith_mc]",
            "eval.harness.limit=4",
            *args,
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]

    (job_dir,) = [p for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]
    job_id = job_dir.name
    acct = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "NNodes,NodeList"], capture_output=True, text=True, timeout=30
    ).stdout.strip()
    nnodes, nodelist = acct.split("|")
    nodes = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30
    ).stdout.split()
    assert nnodes == "2" and len(set(nodes)) == 2, acct
    # One task per node, each its own rank: rank i on the i-th node, local rank 0, world size 2; every task joins the
    # master at the first node's name (which resolves, as node names do on a real cluster).
    logs = [(job_dir / f"{job_id}_{rank}_log.out").read_text() for rank in (0, 1)]
    tasks = []
    for log in logs:
        line = TASK_LINE.search(log)
        assert line, log[-2000:]
        tasks.append(line.groups())
    port = tasks[0][8]
    assert tasks == [
        ("0", "2", nodes[0], "0", "2", "0", "1", nodes[0], port),
        ("1", "2", nodes[1], "1", "2", "0", "1", nodes[0], port),
    ], tasks
    socket.gethostbyname(nodes[0])

    # One run directory, written by rank 0 alone: one attempt, one RNG state per rank in the checkpoints.
    (run_dir,) = [p.parent for p in sweep.glob("*/run_config.yaml")]
    assert "run directory:" in logs[0] and "run directory:" not in logs[1]
    # the trainer logs from rank 0 only (rank 1 is local rank 0 of its node: log_on_each_node does not make it print)
    assert "'loss':" in logs[0] and "'loss':" not in logs[1]
    (attempt,) = json.loads((run_dir / "attempts.json").read_text())
    assert (attempt["slurm_job_id"], attempt["world_size"]) == (job_id, 2), attempt
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_steps"] == 8
    # the harness ran in the job, on rank 0 alone, on the saved model: scores in metrics.json, the table in its log
    assert set(metrics["eval_harness"]["sftexp_arith_mc"]) == {"acc", "acc_norm"}, metrics.get("eval_harness_error")
    assert "lm-eval scores after training" in logs[0] and "sftexp_arith_mc" not in logs[1]
    assert json.loads((run_dir / "eval_harness.json").read_text())["n_samples"]["sftexp_arith_mc"]["effective"] == 4
    ckpt = run_dir / "checkpoint-8"
    assert is_complete(ckpt)
    assert sorted(p.name for p in ckpt.glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]

    got = losses(run_dir / "trainer_state.json")
    print("2 nodes x 1 task:", got, "\n2 local ranks:   ", want)
    assert sorted(got) == sorted(want)
    for step, loss in want.items():
        assert abs(got[step] - loss) <= 1e-6, (step, got[step], loss)


def test_two_run_sweep_through_the_submitit_launcher(tmp_path: Path, shared_cache: Path) -> None:
    """sweep=mixture_random (issue #17) through Slurm like any other sweep: run i trains mixture.draw=i."""
    sweep = tmp_path / "sweep"
    r = launch(
        [
            "-m",
            "hydra/launcher=submitit_slurm",
            "hydra.launcher.partition=debug",
            "hydra.launcher.cpus_per_task=1",
            f"hydra.sweep.dir={sweep}",
            f"cache_dir={shared_cache}",
            "sweep=mixture_random",
            "sweep.trials=2",
            "mixture.total_tokens=1000",
            "train.max_steps=2",
            "mixture.test_split_size=4",
            "packing.max_length=256",
            "eval_before_train=false",
        ],
        cwd=tmp_path,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    runs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    # run i is named after its draw (the preset and sweep.trials stay out of run directory names)
    draws = [[o for o in p.name.split(",") if o.startswith("mixture.draw=")] for p in runs]
    assert draws == [["mixture.draw=0"], ["mixture.draw=1"]] and not any("sweep" in p.name for p in runs), runs
    jobs, shares = set(), []
    for run_dir in runs:
        m = json.loads((run_dir / "metrics.json").read_text())
        assert m["global_steps"] == 2 and m["eval_loss_after"]["all"] > 0
        (attempt,) = json.loads((run_dir / "attempts.json").read_text())
        jobs.add(attempt["slurm_job_id"])
        stats = json.loads((run_dir / "mixture_stats.json").read_text())
        assert stats["mixture"]["weighting"] == "proportion" and stats["mixture"]["total_tokens"] == 1000
        shares.append({n: round(s["weight"], 6) for n, s in stats["sources"].items()})
    assert len(jobs) == 2  # one Slurm (array) job per run
    assert shares[0] != shares[1] and all(abs(sum(s.values()) - 1) < 1e-4 for s in shares)  # two drawn mixtures


def test_a_job_slurm_refuses_is_a_clear_error_and_nothing_runs(tmp_path: Path) -> None:
    # `debug` holds one node: sbatch refuses a 3-node job at once (EnforcePartLimits=ALL in scripts/slurm/up.sh).
    r = launch(
        [
            "launcher=slurm",
            "launcher.partition=debug",
            "distributed=ddp",
            "distributed.nodes=3",
            "distributed.processes_per_node=1",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-4000:]
    assert "error: launcher: Slurm refused the job: Batch job submission failed:" in r.stderr, r.stderr[-2000:]
    assert "launcher.partition=debug (`sinfo -p debug`" in r.stderr and "Traceback" not in r.stderr
    assert not list((tmp_path / "sweep").glob("*/run_config.yaml"))
