"""Several processes for real on this CPU: 2-rank DDP (gloo), DeepSpeed ZeRO-3 against it, and what is refused.

`python launch.py distributed=ddp` composes once, freezes one run directory and spawns the ranks, which read the frozen
config from it; only rank 0 writes. FSDP2 runs for real on CPU ranks (where the Trainer alone would silently run DDP),
checked against DDP; more processes than devices are refused before a run directory exists.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from sft_exp.checkpoints import is_complete, last_complete_checkpoint
from sft_exp.config.preflight import cpu_cores
from tests.conftest import PY, REPO, checkpointed_run_args, launch

# ------------------------------------------------------------------------------------------------ shared runs


def tiny_weights(shared_cache: Path) -> Path:
    """A saved random-init tiny model: ZeRO-3 builds a random-init model partitioned (other random numbers than a
    whole model), so runs compared across strategies start from the same saved weights."""
    folder = shared_cache.parent / "tiny_weights"
    if not (folder / "model.safetensors").exists():
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, set_seed

        from sft_exp.config import ASSETS

        set_seed(0)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ASSETS / "tiny_smollm3")).save_pretrained(folder)
        AutoTokenizer.from_pretrained(ASSETS / "tiny_smollm3").save_pretrained(folder)
    return folder


def dist_args(shared_cache: Path, run_dir: str) -> list[str]:
    """A short 2-rank run: 8 optimizer steps of 2 ranks x 2 micro-batches of one 256-token packed row, evaluated
    before training too (eval_before_train, the default), so strategies compare on their pre-training eval losses,
    and generating before and after training (every rank generates: under ZeRO-3 / FSDP2 no rank holds the model)."""
    return [
        *[a for a in checkpointed_run_args(shared_cache, run_dir) if a != "eval_before_train=false"],
        f"model.name_or_path={tiny_weights(shared_cache)}",
        "model.init=pretrained",
        "distributed.processes_per_node=2",
        *GENERATE,
    ]


GENERATE = ["eval.generate.enabled=true", "eval.generate.rows=2", "eval.generate.max_new_tokens=8"]


def same_generations(got: dict, want: dict) -> None:
    """Two eval_generate.json results of the same weights: the same greedy text for every sample turn."""
    for src, res in want["sources"].items():
        a = [t["generation"] for t in got["sources"][src]["samples"]]
        b = [t["generation"] for t in res["samples"]]
        assert a == b and a, (src, a, b)


def ddp_reference(shared_cache: Path) -> Path:
    """An uninterrupted 2-rank DDP run, made once per test session (tests/test_slurm_train.py compares with it too)."""
    run_dir = shared_cache.parent / "ddp_reference"
    if not (run_dir / "metrics.json").exists():
        r = launch([*dist_args(shared_cache, str(run_dir)), "distributed=ddp"], cwd=shared_cache.parent)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return run_dir


def losses(state_file: Path) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in json.loads(state_file.read_text())["log_history"] if "loss" in h}


# ------------------------------------------------------------------------------------------------ refused


@pytest.mark.slow  # a `python launch.py` process each (torch is imported to count devices)
@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["distributed=ddp", f"distributed.processes_per_node={cpu_cores() + 1}"], "CPU cores and no GPU"),
        (["distributed=ddp", "distributed.nodes=2"], "nodes need Slurm"),
        (["distributed=ddp", "distributed.backend=nccl"], "nccl needs CUDA GPUs"),
        (["distributed.strategy=zero3"], "distributed.deepspeed.zero_optimization.stage"),
    ],
    ids=["more-processes-than-devices", "nodes-without-slurm", "nccl-on-cpu", "zero3-without-config"],
)
def test_what_would_run_wrongly_is_refused_before_anything_runs(
    overrides: list[str], needle: str, tmp_path: Path
) -> None:
    if "cuda" in needle or "GPU" in needle:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    r = launch([f"hydra.run.dir={tmp_path}/run", *overrides], cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run" / "run_config.yaml").exists()


# ------------------------------------------------------------------------------------------------ real ranks


@pytest.mark.slow
def test_ddp_runs_two_real_ranks_into_one_run_directory(shared_cache: Path) -> None:
    run_dir = ddp_reference(shared_cache)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["global_steps"] == 8
    # one RNG state per rank: two processes trained; the other files once, from rank 0
    ckpt = run_dir / "checkpoint-8"
    assert is_complete(ckpt)
    assert sorted(p.name for p in ckpt.glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]
    attempts = json.loads((run_dir / "attempts.json").read_text())
    assert [a["world_size"] for a in attempts] == [2]
    assert sorted(losses(run_dir / "trainer_state.json")) == list(range(1, 9))
    assert sorted(m["eval_loss_before"]) == sorted(m["eval_loss_after"]) and m["eval_loss_before"]["all"] > 0
    assert (run_dir / "mixture_stats.json").exists() and (run_dir / "model.safetensors").exists()
    assert not list(run_dir.parent.glob("ddp_reference?*"))  # one run directory, not one per rank


@pytest.mark.slow
def test_zero3_evaluates_and_trains_like_ddp_and_sigusr1_stops_every_rank_with_a_checkpoint(
    tmp_path: Path, shared_cache: Path
) -> None:
    pytest.importorskip("deepspeed")
    ddp = ddp_reference(shared_cache)
    want = losses(ddp / "trainer_state.json")
    want_before = json.loads((ddp / "metrics.json").read_text())["eval_loss_before"]
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [PY, str(REPO / "launch.py"), *dist_args(shared_cache, str(run_dir)), "distributed=zero3"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    out = []
    for line in proc.stdout:  # the first DeepSpeed run on a machine JIT-builds its shm op first (~1 minute)
        out.append(line)
        if "'loss':" in line:  # training has started: interrupt the launcher, which forwards to both ranks
            proc.send_signal(signal.SIGUSR1)
            break
    rest, _ = proc.communicate(timeout=600)
    text = "".join(out) + rest
    assert proc.returncode == 128 + signal.SIGUSR1, text[-4000:]
    assert "interrupted by SIGUSR1" in text and "resume=" in text
    # eval_before_train under ZeRO-3 (it used to leave an inference-only engine behind and the first backward failed):
    # every source evaluated before the first step, with DDP's losses
    before = json.loads((run_dir / "eval_loss_before.json").read_text())
    assert sorted(before) == sorted(want_before) and "all" in before, (before, want_before)
    for src, loss in want_before.items():
        assert abs(before[src] - loss) <= 1e-5, (src, before[src], loss)
    # generation before training with ZeRO-3-partitioned weights (every rank generates): DDP's metrics
    from sft_exp.eval.generate import metrics_block

    gen = json.loads((run_dir / "eval_generate.json").read_text())
    ddp_before = json.loads((ddp / "metrics.json").read_text())["eval_generate_before"]
    assert gen["label"] == "before" and metrics_block(gen) == ddp_before, (metrics_block(gen), ddp_before)
    ckpt = last_complete_checkpoint(run_dir)
    assert ckpt is not None and not (run_dir / "metrics.json").exists()
    step = int(ckpt.name.split("-")[1])
    assert step < 8
    assert (ckpt / f"global_step{step}").is_dir()  # a DeepSpeed checkpoint: ZeRO-3 really ran, sharded per rank
    assert len(list((ckpt / f"global_step{step}").glob("*optim_states.pt"))) == 2
    history = json.loads((ckpt / "trainer_state.json").read_text())["log_history"]
    assert not [h for h in history if any(k.startswith("eval_") for k in h)]  # as under DDP: no row for that eval
    got = losses(ckpt / "trainer_state.json")
    assert sorted(got) == list(range(1, step + 1))
    for s, loss in got.items():
        assert abs(loss - want[s]) <= 1e-5, (s, loss, want[s])


@pytest.mark.slow
def test_fsdp2_shards_for_real_on_cpu_ranks_trains_like_ddp_saves_one_model_and_resumes(
    tmp_path: Path, shared_cache: Path
) -> None:
    from safetensors.torch import load_file

    ddp = ddp_reference(shared_cache)
    run_dir = tmp_path / "run"
    args = [*dist_args(shared_cache, str(run_dir)), "distributed=fsdp"]
    r = launch(args, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    # FSDP2 really sharded (accelerate alone would have run DDP here): every checkpoint holds the model and the
    # optimizer state as torch.distributed.checkpoint shards, one per rank.
    for ckpt in sorted(run_dir.glob("checkpoint-*")):
        for part in ("pytorch_model_fsdp_0", "optimizer_0"):
            assert sorted(p.name for p in (ckpt / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"], ckpt
    want, got = losses(ddp / "trainer_state.json"), losses(run_dir / "trainer_state.json")
    assert sorted(got) == list(range(1, 9))
    for s, loss in got.items():
        assert abs(loss - want[s]) <= 1e-5, (s, loss, want[s])
    m, m_ddp = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, ddp))
    assert m["world_size"] == 2
    for key in ("eval_loss_before", "eval_loss_after"):
        for src, loss in m_ddp[key].items():
            assert abs(m[key][src] - loss) <= 1e-5, (key, src, m[key][src], loss)
    # generation with FSDP2-sharded weights (every rank generates), before and after training: DDP's greedy text
    assert m["eval_generate_before"] == m_ddp["eval_generate_before"]
    same_generations(*(json.loads((d / "eval_generate.json").read_text()) for d in (run_dir, ddp)))
    # The final model gathered from the shards (transformers writes none with sharded checkpoints), tied weights once.
    final, final_ddp = load_file(run_dir / "model.safetensors"), load_file(ddp / "model.safetensors")
    assert sorted(final) == sorted(final_ddp)
    assert max(float((final[k] - final_ddp[k]).abs().max()) for k in final) < 1e-5

    # Resume from a sharded checkpoint (a copy of the run cut back to checkpoint-4): the same losses and model.
    cut = tmp_path / "cut"
    shutil.copytree(run_dir, cut)
    for p in ("checkpoint-6", "checkpoint-8", "metrics.json", "model.safetensors", "trainer_state.json"):
        shutil.rmtree(cut / p) if (cut / p).is_dir() else (cut / p).unlink()
    r = launch([*args[1:], f"resume={cut}"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "from checkpoint-4" in r.stdout + r.stderr
    assert losses(cut / "trainer_state.json") == got
    m_cut = json.loads((cut / "metrics.json").read_text())
    assert m_cut["resumed_from"] == "checkpoint-4" and m_cut["train_loss_mean"] == m["train_loss_mean"]  # whole run
    resumed = load_file(cut / "model.safetensors")
    assert all(bool((resumed[k] == final[k]).all()) for k in final)


# ------------------------------------------------------------------------------------------------ a rank that fails

# Real ranks of the real launcher (sft_exp.launch.ranks), with gloo, with the training replaced: rank 1 fails, rank 0
# waits for it at a barrier and loses its peer (gloo: "Connection closed by peer"), the way a real run does.
FAKE_RANK = r"""
import os, signal, sys, time

import torch.distributed as dist

from sft_exp.checkpoints import SaveFailed
from sft_exp.errors import ConfigError
from sft_exp.launch import ranks

mode = os.environ["FAKE_MODE"]


def run_rank(run_dir, resume_from, on_error=None, **kwargs):
    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        print(f"rank {rank} training", flush=True)
        if mode == "stop":
            signal.signal(signal.SIGUSR1, lambda s, f: sys.exit(128 + s))  # stands in for the checkpoint and exit
            time.sleep(60)
        if rank == 1:
            time.sleep(0.5)
            if mode == "config":
                raise ConfigError("sources.arith: bad row")
            if mode == "save_failed":
                raise SaveFailed("checkpoint-1 save", run_dir / "checkpoint-1", run_dir, 28, "No space left on device")
            if mode == "killed":
                os.kill(os.getpid(), signal.SIGKILL)
            1 / 0  # a bug
        dist.barrier()
    except BaseException as e:
        on_error(e)
        raise
    finally:
        dist.destroy_process_group()


ranks.run_rank = run_rank
ranks.main()
"""


def _start_fake_ranks(mode: str, run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from sft_exp.launch import ranks

    (run_dir / "fake_rank.py").write_text(FAKE_RANK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(run_dir), str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_MODE", mode)
    monkeypatch.setattr(ranks, "RANK_MODULE", "fake_rank")
    run = SimpleNamespace(distributed=SimpleNamespace(master_port=None))
    ranks.start_ranks(run, run_dir, 2, None)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["config", "save_failed", "bug", "killed"])
def test_a_failing_rank_is_shown_and_the_tracebacks_of_the_ranks_it_took_down_are_not(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sft_exp.checkpoints import SaveFailed
    from sft_exp.config import ConfigError

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "rank0.log").write_text("an earlier attempt\n")
    error = {"config": ConfigError, "save_failed": SaveFailed, "bug": RuntimeError, "killed": RuntimeError}[mode]
    with pytest.raises(error, match="rank 1 of 2") as e:
        _start_fake_ranks(mode, tmp_path, monkeypatch)
    out, err = capsys.readouterr()
    text = out + err
    assert "rank 0 training" in out and "rank 1 training" in out  # the ranks' output is shown live
    assert "Connection closed by peer" not in text and "[rank0]" not in text, text  # rank 0's error is not
    logs = tmp_path / "logs"
    assert f"[sft-exp] rank 0 stopped after rank 1 failed; see {logs}/rank0.log, {logs}/rank0.error.json" in err, err
    assert "Connection closed by peer" in (logs / "rank0.error.json").read_text()  # its traceback is kept there
    if mode == "bug":
        assert "ZeroDivisionError" in err and "Traceback" in err and str(e.value).endswith("were stopped")
    elif mode == "killed":
        assert "rank 1 of 2 was killed by SIGKILL" in str(e.value) and "Traceback" not in text
    else:
        assert text.count("[rank 1] error: ") == 1 and "Traceback" not in text, text
        assert e.value.exit_code == (74 if mode == "save_failed" else 2)
    assert "[rank 1] error" in (logs / "rank1.log").read_text() or mode in ("bug", "killed")
    # the earlier attempt's log was kept aside (torch truncates the log files)
    assert (logs / "attempt-1" / "rank0.log").read_text() == "an earlier attempt\n"
    assert "rank 0 training" in (logs / "rank0.log").read_text()


def test_a_stop_signal_is_forwarded_to_every_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    from sft_exp.errors import Interrupted

    def stop_when_both_train() -> None:
        logs = [tmp_path / "logs" / f"rank{r}.log" for r in (0, 1)]
        while not all(p.exists() and "training" in p.read_text() for p in logs):
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGUSR1)  # to the launcher (this process), which forwards it

    threading.Thread(target=stop_when_both_train, daemon=True).start()
    with pytest.raises(Interrupted) as e:
        _start_fake_ranks("stop", tmp_path, monkeypatch)
    assert e.value.signum == signal.SIGUSR1 and e.value.exit_code == 128 + signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the launcher's handlers are restored
