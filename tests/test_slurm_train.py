"""Training through Slurm for real (the local cluster of scripts/slurm/up.sh), submitted by Hydra's submitit launcher.

- launcher=slurm with distributed=ddp: one job of 2 tasks, each task one rank (rank/world from submitit's
  JobEnvironment); `scontrol requeue` of the running job: it saves a checkpoint on SIGTERM, Slurm restarts it, and
  it continues in the same run directory from that checkpoint to the same losses as an uninterrupted run.
- -m hydra/launcher=submitit_slurm with a comma list: a 2-run sweep, both runs finish with metrics.
"""

from __future__ import annotations

import json
import os
import shutil
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


def test_two_run_sweep_through_the_submitit_launcher(tmp_path: Path, shared_cache: Path) -> None:
    sweep = tmp_path / "sweep"
    r = launch(
        [
            "-m",
            "hydra/launcher=submitit_slurm",
            "hydra.launcher.partition=debug",
            "hydra.launcher.cpus_per_task=1",
            f"hydra.sweep.dir={sweep}",
            f"cache_dir={shared_cache}",
            "train.learning_rate=1e-3,3e-3",
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
    assert len(runs) == 2 and all("train.learning_rate=" in p.name for p in runs)
    jobs = set()
    for run_dir in runs:
        m = json.loads((run_dir / "metrics.json").read_text())
        assert m["global_steps"] == 2 and m["eval_loss_after"]["all"] > 0
        (attempt,) = json.loads((run_dir / "attempts.json").read_text())
        jobs.add(attempt["slurm_job_id"])
    assert len(jobs) == 2  # one Slurm (array) job per run
