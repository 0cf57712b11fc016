"""launcher=slurm's Hydra launcher class (hydra_plugins/sft_exp_launcher): what it makes of sbatch's refusals.
The same with a real Slurm: tests/test_slurm_train.py::test_a_job_slurm_refuses_is_a_clear_error_and_nothing_runs."""

from __future__ import annotations

from hydra_plugins.sft_exp_launcher import SlurmLauncher, refusal
from tests.conftest import compose


def test_sbatch_refusal_names_the_reason_and_the_settings_to_check() -> None:
    params = {"partition": "gpu", "nodes": 8, "tasks_per_node": 8}
    stderr = "sbatch: error: Batch job submission failed: Requested node configuration is not available\n"
    msg = refusal(["sbatch", "/x/submission_file.sh"], stderr, params)
    assert msg is not None
    assert msg.startswith("launcher: Slurm refused the job: Batch job submission failed: Requested node configuration")
    assert "launcher.partition=gpu (`sinfo -p gpu`" in msg and "8 node(s) x 8 task(s)" in msg
    assert "the default partition" in str(refusal(["/usr/bin/sbatch"], stderr, {**params, "partition": None}))
    assert refusal(["sacct", "-j", "1"], stderr, params) is None  # not a submission: the plugin's own error stands


def test_launcher_slurm_uses_this_launcher_class() -> None:
    cfg = compose(["launcher=slurm"], return_hydra_config=True)
    target = cfg.hydra.launcher._target_
    assert target == "hydra_plugins.sft_exp_launcher.SlurmLauncher"
    assert f"{SlurmLauncher.__module__}.{SlurmLauncher.__name__}" == target
