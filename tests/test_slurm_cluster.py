"""Checks the local Slurm test cluster that scripts/slurm/up.sh brings up.

Run `bash scripts/slurm/up.sh` first; these tests skip only when Slurm's commands are not
installed at all (a cluster that is installed but down is a failure, not a skip).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

pytestmark = pytest.mark.slurm

if shutil.which("sinfo") is None:
    pytest.skip(
        "Slurm is not installed (no `sinfo` on PATH): run `bash scripts/slurm/up.sh` first",
        allow_module_level=True,
    )


def _run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}"
    return proc.stdout


def test_cluster_answers() -> None:
    partitions = _run("sinfo", "-h", "-o", "%P %a %t").split("\n")
    debug = [line.split() for line in partitions if line.startswith("debug")]
    assert debug, f"no `debug` partition in sinfo output: {partitions}"
    name, avail, state = debug[0]
    assert name == "debug*", "debug should be the default partition"
    assert avail == "up"
    assert state in {"idle", "mix", "alloc", "comp"}, f"node state is {state!r}"
    # sacct answers only when slurmdbd and its database are up: submitit needs it for job.state.
    _run("sacct", "-n", "-X", "-S", "now-1hours")


def _wait(job, timeout_s: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} not done after {timeout_s:.0f}s (state {job.state})")
        time.sleep(0.5)


def test_submitit_two_tasks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    submitit = pytest.importorskip("submitit")

    # Defined inside the test so that cloudpickle sends it by value: the job's Python does not
    # have tests/ on its path.
    def where_am_i() -> tuple[int, int, int, str]:
        import submitit as sm

        env = sm.JobEnvironment()
        return env.global_rank, env.local_rank, env.num_tasks, env.job_id

    executor = submitit.AutoExecutor(folder=tmp_path)
    assert executor.cluster == "slurm"
    executor.update_parameters(slurm_partition="debug", tasks_per_node=2, nodes=1, cpus_per_task=1, timeout_min=5)
    job = executor.submit(where_am_i)
    _wait(job)

    results = job.results()
    assert len(results) == 2, results
    assert sorted(r[0] for r in results) == [0, 1], results  # global ranks
    assert sorted(r[1] for r in results) == [0, 1], results  # local ranks
    assert all(r[2] == 2 for r in results), results  # world size
    assert all(r[3] == str(job.job_id) for r in results), results

    # job.state comes from sacct: it stays UNKNOWN when accounting is missing.
    deadline = time.monotonic() + 60
    while job.state != "COMPLETED":
        assert job.state in {"UNKNOWN", "PENDING", "RUNNING", "COMPLETING"}, job.state
        assert time.monotonic() < deadline, f"job.state is {job.state}, not COMPLETED"
        time.sleep(0.5)


def test_submitit_two_nodes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """up.sh runs two slurmd daemons (two Slurm nodes on this machine); partition `multi` holds both."""
    submitit = pytest.importorskip("submitit")

    def where_am_i() -> tuple[int, int, int, int, int, str, list[str]]:
        import os

        import submitit as sm

        env = sm.JobEnvironment()
        return (
            env.global_rank,
            env.local_rank,
            env.node,
            env.num_nodes,
            env.num_tasks,
            os.environ["SLURMD_NODENAME"],
            list(env.hostnames),
        )

    executor = submitit.AutoExecutor(folder=tmp_path)
    executor.update_parameters(slurm_partition="multi", nodes=2, tasks_per_node=1, cpus_per_task=1, timeout_min=5)
    job = executor.submit(where_am_i)
    _wait(job)

    results = sorted(job.results())
    assert [r[:5] for r in results] == [(0, 0, 0, 2, 2), (1, 0, 1, 2, 2)], results
    hostnames = results[0][6]
    assert len(set(hostnames)) == 2 and all(r[6] == hostnames for r in results), results
    assert [r[5] for r in results] == hostnames, results  # task i on the i-th node of the job's node list
    for name in hostnames:  # node names resolve, as on a real cluster (the master address is the first one)
        socket.gethostbyname(name)
