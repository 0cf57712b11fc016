"""Never lose a run: complete-checkpoint markers, resume=true / resume=<dir>, stop signals that save first.

The slow test kills a real run (SIGKILL, then SIGTERM) and resumes it until it finishes; the loss history must equal
an uninterrupted run's (CPU training here is deterministic: equal to the last bit, checked within 1e-6). SIGUSR1 is
checked in tests/test_distributed.py (forwarded to the ranks), a Slurm requeue in tests/test_slurm_train.py.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sft_exp.checkpoints import (
    MARKER,
    SaveFailed,
    checkpoints,
    is_complete,
    last_complete_checkpoint,
    mark_complete,
    prune_incomplete,
    rotate,
    save_guard,
)
from sft_exp.config import ConfigError, validate
from sft_exp.config.frozen import freeze
from sft_exp.io import write_json
from sft_exp.launch.job import HydraJob
from sft_exp.launch.resume import config_differences, find_latest_run
from sft_exp.rundir import RunDir
from tests.conftest import PY, REPO, checkpointed_run_args, compose, launch

FROZEN = RunDir(".").frozen.name

# ------------------------------------------------------------------------------------------------ checkpoint files


def _fake_checkpoint(run_dir: Path, step: int, complete: bool = True) -> Path:
    ckpt = run_dir / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"w" * 100)
    (ckpt / "trainer_state.json").write_text("{}")
    if complete:
        mark_complete(ckpt, step)
    return ckpt


def test_only_marked_checkpoints_with_intact_files_count(tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path, 2)
    c4 = _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 6, complete=False)  # a crash during its save: files, no marker
    assert last_complete_checkpoint(tmp_path) == c4
    (c4 / "model.safetensors").write_bytes(b"w" * 10)  # torn after marking (disk trouble): no longer complete
    assert not is_complete(c4)
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    removed = prune_incomplete(tmp_path)
    assert sorted(p.name for p in removed) == ["checkpoint-4", "checkpoint-6"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-2"]


def test_rotation_keeps_the_newest_complete_ones(tmp_path: Path) -> None:
    for s in (2, 4, 6):
        _fake_checkpoint(tmp_path, s)
    _fake_checkpoint(tmp_path, 5, complete=False)
    _fake_checkpoint(tmp_path, 8, complete=False)  # newer than the last complete one: may still be being written
    rotate(tmp_path, keep_last=1, protect=str(tmp_path / "checkpoint-2"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-6", "checkpoint-8"]
    assert (tmp_path / "checkpoint-6" / MARKER).exists()


# ------------------------------------------------------------------------------------------------ finding the run


def _fake_run(root: Path, name: str, overrides: list[str], finished: bool = False) -> Path:
    run_dir = root / name
    freeze(_run(overrides), run_dir, overrides)
    if finished:
        (run_dir / "metrics.json").write_text("{}")
    return run_dir


def _run(overrides: list[str]):  # type: ignore[no-untyped-def]
    from sft_exp.config import to_run_config

    return to_run_config(compose(overrides))


def test_resume_true_finds_the_latest_run_of_the_same_overrides(tmp_path: Path) -> None:
    a = _fake_run(tmp_path, "d1/10-00-00", ["train.max_steps=5"])
    time.sleep(0.02)
    _fake_run(tmp_path, "d1/10-00-01", ["train.max_steps=7"])
    time.sleep(0.02)
    b = _fake_run(tmp_path, "d2/09-00-00", ["train.max_steps=5", "launcher=local"])  # launcher: not part of a run
    pattern = f"{tmp_path}/${{now:%Y-%m-%d}}/${{now:%H-%M-%S}}"
    job = HydraJob(tmp_path / "new", ["train.max_steps=5", "resume=true"], pattern, multirun=False)
    assert find_latest_run(job) == b
    os.utime(a / FROZEN, (time.time() + 10, time.time() + 10))
    assert find_latest_run(job) == a
    with pytest.raises(ConfigError, match="no run directory"):
        find_latest_run(HydraJob(tmp_path / "new", ["train.max_steps=9"], pattern, multirun=False))


def test_a_resumed_command_must_compose_the_frozen_config() -> None:
    frozen = _run(["train.max_steps=5"])
    assert config_differences(frozen, _run(["train.max_steps=5", "resume=true", "launcher=slurm"])) == []
    diffs = config_differences(frozen, _run(["train.max_steps=6"]))
    assert diffs == ["train.max_steps: 5 in the run, 6 now"]


def test_resume_must_name_a_run_directory(tmp_path: Path) -> None:
    for bad in (str(tmp_path), "yes"):
        with pytest.raises(ConfigError, match="resume"):
            validate(_run([f"resume={bad}"]))


@pytest.mark.slow  # a `python launch.py` process
def test_a_finished_run_is_not_resumed(tmp_path: Path) -> None:
    _fake_run(tmp_path, "run", ["train.max_steps=5"], finished=True)
    r = launch([f"hydra.run.dir={tmp_path}/run", "train.max_steps=5", "resume=true"], cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "has finished" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------------ real runs, killed


def _losses(run_dir: Path) -> dict[int, float]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [PY, str(REPO / "launch.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _kill_after_checkpoint(proc: subprocess.Popen, runs: Path, step: int, sig: int, timeout: float = 300) -> str:
    """Send `sig` once checkpoint-<step> of the (only) run under `runs` is complete; returns the process output."""
    deadline = time.monotonic() + timeout
    while not any(is_complete(c) for c in runs.glob(f"**/checkpoint-{step}")):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    return out


def _with_eval_before(args: list[str]) -> list[str]:
    """The default eval_before_train=true: the resumed run skips that eval and must still train the same."""
    return [a for a in args if a != "eval_before_train=false"]


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path: Path, shared_cache: Path) -> None:
    ref = launch(_with_eval_before(checkpointed_run_args(shared_cache, f"{tmp_path}/ref")), cwd=tmp_path)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-3000:]
    want = _losses(tmp_path / "ref")
    assert sorted(want) == list(range(1, 9))

    runs = tmp_path / "runs"
    args = _with_eval_before(checkpointed_run_args(shared_cache, f"{runs}/${{now:%H-%M-%S-%f}}"))
    # 1. SIGKILL after checkpoint-2: nothing can be saved; the last complete checkpoint is what is left.
    proc = _start(args, tmp_path)
    _kill_after_checkpoint(proc, runs, 2, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    (run_dir,) = [p.parent for p in runs.glob(f"*/{FROZEN}")]
    assert not (run_dir / "metrics.json").exists()
    # A save torn by the crash (files without the marker) must not be picked up.
    last = last_complete_checkpoint(run_dir)
    assert last is not None
    torn = run_dir / f"checkpoint-{int(last.name.split('-')[1]) + 2}"
    if not torn.exists():
        torn.mkdir()
        (torn / "model.safetensors").write_bytes((last / "model.safetensors").read_bytes()[:100])

    # 2. resume=<dir>, then SIGTERM: the ranks save a checkpoint at the end of the step and exit 128 + 15.
    proc = _start([*args, f"resume={run_dir}"], tmp_path)
    out = _kill_after_checkpoint(proc, runs, 4, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert f"removed {torn.name}" in out and f"resuming {run_dir} from {last.name}" in out
    assert "interrupted by SIGTERM" in out and "resume=" in out
    stopped_at = last_complete_checkpoint(run_dir)
    assert stopped_at is not None and not (run_dir / "metrics.json").exists()

    # 3. resume=true (the same command) finishes it, in the same directory.
    r = launch([*args, "resume=true"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"resuming {run_dir} from {stopped_at.name}" in r.stdout
    assert [p.parent for p in runs.glob(f"*/{FROZEN}")] == [run_dir]
    assert sorted(p.name for p in runs.iterdir()) == [run_dir.name]  # Hydra's fresh folders were not left behind
    got = _losses(run_dir)
    assert sorted(got) == sorted(want)
    for step, loss in want.items():
        assert abs(got[step] - loss) <= 1e-6, (step, got[step], loss)
    m, m_ref = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, tmp_path / "ref"))
    assert m["resumed_from"] == stopped_at.name and m["global_steps"] == 8
    for k, v in m_ref["eval_loss_after"].items():
        assert abs(m["eval_loss_after"][k] - v) <= 1e-6, k
    attempts = json.loads((run_dir / "attempts.json").read_text())
    assert [a["resumed_from"] for a in attempts] == [None, last.name, stopped_at.name]


def _resample_each_epoch_args(cache: Path, run_dir: str | Path) -> list[str]:
    """2 epochs of 4 optimizer steps (8 packed rows of 512 tokens, 2 per step), a checkpoint every step, each epoch
    its own seeded rows (mixture.resample_each_epoch) of two sources; max_length 512 truncates none of them."""
    drop = ("train.max_steps=", "train.save_steps=", "packing.max_length=")
    off = [f"mixture.sources.{s}.weight=0" for s in ("count", "reverse", "sort", "tools")]
    return [
        *(a for a in checkpointed_run_args(cache, run_dir) if not a.startswith(drop)),
        "train.max_steps=-1",  # -1: train.num_train_epochs decides
        "train.num_train_epochs=2",
        "train.save_steps=1",
        "packing.max_length=512",
        *off,
        "mixture.sources.arith.weight=0.007",
        "mixture.sources.units.weight=0.007",
        "mixture.resample_each_epoch=true",
    ]


@pytest.mark.slow
def test_resume_in_the_middle_of_epoch_2_trains_epoch_2s_fresh_rows(
    tmp_path: Path, shared_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mixture.resample_each_epoch: a run stopped (SIGTERM) inside its 2nd epoch and resumed trains the rest of that
    epoch on the epoch's own rows, as the uninterrupted run does: equal losses at every step, the resumed steps
    included. Resuming on the first epoch's rows (the Trainer fast-forwards the resumed epoch's loader without passing
    the epoch to the dataset) would change every loss after the cut."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # every process alike; 2 threads stall for seconds on a busy 2-core box
    ref_dir = tmp_path / "ref"
    ref = launch(_resample_each_epoch_args(shared_cache, ref_dir), cwd=tmp_path)
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-3000:]
    want = _losses(ref_dir)
    assert sorted(want) == list(range(1, 9))
    epoch_of = {h["step"]: h["epoch"] for h in json.loads((ref_dir / "trainer_state.json").read_text())["log_history"]}
    assert epoch_of[4] == 1.0 and epoch_of[8] == 2.0  # steps 1-4: epoch 1, steps 5-8: epoch 2
    ref_stats = json.loads((ref_dir / "mixture_stats.json").read_text())
    rows_per_epoch = ref_stats["mixture"]["rows_per_epoch"]
    for name in ("arith", "units"):  # each epoch trains as many rows, none trained in the epoch before
        rows = rows_per_epoch[name]
        assert rows["rows"] == rows["new_rows"] and len(rows["rows"]) == 2 and rows["rows"][0] > 0, rows_per_epoch
    # ... and the run really trained them: epoch 1's rows twice would be exactly twice epoch 1's trained tokens
    trained = json.loads((ref_dir / "metrics.json").read_text())["trained_tokens_per_source"]
    epoch_1 = {n: ref_stats["sources"][n]["trained_tokens"] for n in ("arith", "units")}
    assert any(trained[n] != 2 * epoch_1[n] for n in epoch_1), (trained, epoch_1)

    runs = tmp_path / "runs"
    args = _resample_each_epoch_args(shared_cache, f"{runs}/${{now:%H-%M-%S-%f}}")
    proc = _start(args, tmp_path)
    out = _kill_after_checkpoint(proc, runs, 5, signal.SIGTERM)  # step 5: the first of epoch 2
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    (run_dir,) = [p.parent for p in runs.glob(f"*/{FROZEN}")]
    stopped_at = last_complete_checkpoint(run_dir)
    assert stopped_at is not None and not (run_dir / "metrics.json").exists()
    cut = int(stopped_at.name.split("-")[1])
    assert 4 < cut < 8, stopped_at  # inside epoch 2: the resumed process starts with a part of epoch 2 skipped

    r = launch([*args, "resume=true"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"resuming {run_dir} from {stopped_at.name}" in r.stdout
    got = _losses(run_dir)
    assert sorted(got) == sorted(want)
    for step, loss in want.items():
        assert abs(got[step] - loss) <= 1e-6, (step, cut, got[step], loss)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["resumed_from"] == stopped_at.name and m["global_steps"] == 8
    stats = json.loads((run_dir / "mixture_stats.json").read_text())["mixture"]
    assert stats["resample_each_epoch"] is True and stats["rows_per_epoch"] == rows_per_epoch


# ------------------------------------------------------------------------------------------------ a save that fails


def test_failed_writes_become_a_short_report_and_bugs_keep_their_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / FROZEN).write_text("{}")
    _fake_checkpoint(tmp_path, 2)
    half = _fake_checkpoint(tmp_path, 4, complete=False)
    written = [
        OSError(errno.ENOSPC, "No space left on device", str(half / "optimizer.pt")),  # Python's own writes
        RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
    ]
    for error in written:
        with pytest.raises(SaveFailed) as e, save_guard("checkpoint-4 save", half, tmp_path):
            raise error
        assert e.value.code == errno.ENOSPC and e.value.exit_code == 74 and e.value.last_complete.name == "checkpoint-2"
        assert str(e.value).startswith("checkpoint-4 save failed: No space left on device (ENOSPC")
        assert "checkpoint-4 is incomplete" in str(e.value) and f"resume={tmp_path}" in str(e.value)
    with pytest.raises(SaveFailed, match="a write failed|ENOSPC"), save_guard("checkpoint-4 save", half, tmp_path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # torch.save
    with pytest.raises(TypeError), save_guard("checkpoint-4 save", half, tmp_path):
        raise TypeError("cannot pickle 'generator' object")  # not a storage problem: not disguised as one

    (tmp_path / "metrics.json").write_text("{}")

    def full(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(SaveFailed, match="metrics.json write failed: No space left on device"):
        write_json(tmp_path / "metrics.json", {"done": True})
    monkeypatch.undo()
    assert (tmp_path / "metrics.json").read_text() == "{}" and not list(tmp_path.glob(".metrics.json.tmp*"))


# Put on PYTHONPATH, this makes torch.save of one file (SFT_EXP_TEST_ENOSPC=checkpoint-N/<file>) hit a full disk the
# way Python's own writes do: part of the file written, then OSError ENOSPC. (torch's C++ writer really raises a
# RuntimeError without errno; sft_exp.checkpoints.save_guard diagnoses those from the filesystem.)
ENOSPC_SITECUSTOMIZE = """
import errno
import os

_target = os.environ.get("SFT_EXP_TEST_ENOSPC")
if _target:
    import torch

    _save = torch.save

    def _full_disk_save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and os.fspath(f).endswith(os.sep + _target):
            with open(f, "wb") as out:
                out.write(b"\\0" * 4096)  # what fitted before the disk filled up
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(f))
        return _save(obj, f, *args, **kwargs)

    torch.save = _full_disk_save
"""


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_save_is_reported_and_the_run_resumes(
    tmp_path: Path, shared_cache: Path
) -> None:
    run_dir = tmp_path / "run"
    keep = ("train.max_steps=", "train.save_steps=")
    args = [a for a in checkpointed_run_args(shared_cache, run_dir) if not a.startswith(keep)]
    args += ["train.max_steps=2", "train.save_steps=1", "train.save_total_limit=1"]
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(ENOSPC_SITECUSTOMIZE)
    pythonpath = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)

    # 1. checkpoint-1 completes; checkpoint-2's optimizer.pt hits a full disk.
    r = launch(args, cwd=tmp_path, env={"PYTHONPATH": pythonpath, "SFT_EXP_TEST_ENOSPC": "checkpoint-2/optimizer.pt"})
    assert r.returncode == 74, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    report = r.stderr[r.stderr.index("error: ") :].rstrip().splitlines()
    assert len(report) == 3, report  # the last thing printed: what failed, the fix, how to continue
    assert report[0] == (
        f"error: checkpoint-2 save failed: No space left on device (ENOSPC): {run_dir}/checkpoint-2/optimizer.pt"
    ), report
    assert report[1].startswith("  fix: free space on that filesystem; checkpoint-2 is incomplete"), report
    resume = "  then continue the run from checkpoint-1, its last complete checkpoint: python launch.py "
    assert report[2].startswith(resume) and report[2].endswith(f" resume={run_dir}"), report
    # The half-written checkpoint is not marked; the previous one is intact (rotation left it); nothing looks finished.
    assert (run_dir / "checkpoint-2" / "model.safetensors").exists() and not is_complete(run_dir / "checkpoint-2")
    assert last_complete_checkpoint(run_dir) == run_dir / "checkpoint-1"
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "model.safetensors").exists()

    # 2. Space freed: the command the error printed continues from checkpoint-1 and trains step 2 (checkpoint-2,
    # the last step); then the final model save hits a full disk: exit 74, checkpoint-2 complete, nothing finished.
    final_save = {"PYTHONPATH": pythonpath, "SFT_EXP_TEST_ENOSPC": f"{run_dir.name}/training_args.bin"}
    r = launch([*args, f"resume={run_dir}"], cwd=tmp_path, env=final_save)
    assert r.returncode == 74, r.stdout[-2000:] + r.stderr[-3000:]
    assert "removed checkpoint-2" in r.stdout and f"resuming {run_dir} from checkpoint-1" in r.stdout
    assert "final model save failed: No space left on device" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "from checkpoint-2, its last complete checkpoint" in r.stderr, r.stderr[-2000:]
    assert [p.name for _, p in checkpoints(run_dir)] == ["checkpoint-2"] and is_complete(run_dir / "checkpoint-2")
    assert not (run_dir / "metrics.json").exists()
    history = json.loads((run_dir / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    want = _losses(run_dir / "checkpoint-2")
    assert sorted(want) == [1, 2]

    # 3. Resumed from the checkpoint of the last step (max_steps): no step is trained again (transformers would train
    # a step 3); the run just finishes (final eval, model, metrics.json) with the loss history it had.
    r = launch([*args, f"resume={run_dir}"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"resuming {run_dir} from checkpoint-2" in r.stdout
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["resumed_from"] == "checkpoint-2" and m["global_steps"] == 2 and m["eval_loss_after"], m
    assert _losses(run_dir) == want
    final = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    assert final[: len(history)] == history and not [h for h in final[len(history) :] if "loss" in h], final
    assert (run_dir / "model.safetensors").read_bytes() == (run_dir / "checkpoint-2" / "model.safetensors").read_bytes()
    assert [p.name for _, p in checkpoints(run_dir)] == ["checkpoint-2"]


@pytest.mark.slow
def test_a_rank_whose_save_fails_is_reported_without_the_other_ranks_tracebacks(
    tmp_path: Path, shared_cache: Path
) -> None:
    """2 DDP ranks; rank 1's share of checkpoint-1 (its RNG state) hits a full disk. Rank 0, waiting for it at the
    save's barrier, loses its peer (gloo: "Connection closed by peer"): the launcher shows rank 1's report and its
    own, and keeps rank 0's traceback in its error file (logs/rank0.error.json)."""
    run_dir = tmp_path / "run"
    keep = ("train.max_steps=", "train.save_steps=")
    args = [a for a in checkpointed_run_args(shared_cache, run_dir) if not a.startswith(keep)]
    args += ["train.max_steps=1", "train.save_steps=1", "distributed=ddp", "distributed.processes_per_node=2"]
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(ENOSPC_SITECUSTOMIZE)
    pythonpath = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    full = {"PYTHONPATH": pythonpath, "SFT_EXP_TEST_ENOSPC": "checkpoint-1/rng_state_1.pth"}
    r = launch(args, cwd=tmp_path, env=full)
    assert r.returncode == 74, r.stdout[-2000:] + r.stderr[-3000:]
    text = r.stdout + r.stderr  # the ranks' output is shown on the launcher's stdout
    assert "Traceback" not in text and "Connection closed by peer" not in text, text[-4000:]
    failed = f"[rank 1] error: checkpoint-1 save failed: No space left on device (ENOSPC): {run_dir}/checkpoint-1/"
    assert text.count(failed) == 1, text[-3000:]
    logs = run_dir / "logs"
    quiet = f"[sft-exp] rank 0 stopped after rank 1 failed; see {logs}/rank0.log, {logs}/rank0.error.json"
    assert quiet in r.stderr, r.stderr[-3000:]
    assert "error: a save by rank 1 of 2 failed" in r.stderr and f"resume={run_dir}" in r.stderr.splitlines()[-1]
    # rank 0 lost its peer; gloo says so as "Connection closed by peer" or "Read error ... reset by peer", by timing
    assert re.search(r"Connection (closed|reset) by peer|Read error", (logs / "rank0.error.json").read_text())
    assert failed in (logs / "rank1.log").read_text()
    assert not is_complete(run_dir / "checkpoint-1") and not (run_dir / "metrics.json").exists()


def test_mean_train_loss_covers_every_logged_window_of_the_run() -> None:
    from sft_exp.train.loop import mean_train_loss

    # logging_steps=3 over 7 steps: windows of 1 (logging_first_step), 2, 3 and a last one of 1; eval rows ignored.
    history = [
        {"step": 1, "loss": 4.0},
        {"step": 3, "loss": 2.0},
        {"step": 3, "eval_loss": 9.0},
        {"step": 6, "loss": 1.0},
        {"step": 7, "loss": 5.0},
        {"step": 7, "train_runtime": 1.0},
    ]
    assert mean_train_loss(history, fallback=-1.0) == (4.0 + 2 * 2.0 + 3 * 1.0 + 5.0) / 7
    assert mean_train_loss([], fallback=-1.0) == -1.0  # nothing logged: the Trainer's figure


@pytest.mark.parametrize(
    "path",
    [
        "/runs/2026-11-28/12-00-00",
        "/sweeps/x/train.learning_rate=1e-3,mixture.sources.arith.weight=0.5",  # a sweep's run directory
        "/runs/with space/it's here",
        '/runs/odd"$name\\x',
        "/runs/a\\'b\\",  # backslashes before a quote and at the end: Hydra would read them as escapes
    ],
)
def test_the_printed_resume_command_gives_hydra_the_run_directory_back(path: str) -> None:
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from sft_exp.launch.local import resume_command

    job = HydraJob(Path(path), ["train.report_to=[none]", "template.date_string=26 July 2024"], "", multirun=False)
    argv = shlex.split(resume_command(Path(path), job))  # what the shell makes of the pasted command
    assert argv[:2] == ["python", "launch.py"]
    parsed = OverridesParser.create().parse_overrides(argv[2:])
    assert [(o.key_or_group, o.value()) for o in parsed] == [
        ("train.report_to", ["none"]),
        ("template.date_string", "26 July 2024"),
        ("resume", path),
    ]
