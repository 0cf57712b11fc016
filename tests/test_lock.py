"""The lock (sft_exp/lock.py, <run dir>/lock.json): versions, revisions resolved to commit SHAs (hub mocked: the
HfApi look-ups are the one thing replaced), content and template hashes, git state; and `lock=<run dir>` re-runs with
the locked config and revisions, warning about package versions that differ."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from sft_exp.config import to_run_config
from sft_exp.config.frozen import freeze, load_frozen
from sft_exp.lock import PACKAGES
from tests.conftest import compose

MODEL_SHA = "a" * 40
DATA_SHA = "b" * 40
HUB = ["model.name_or_path=org/model", "model.revision=main", "mixture.sources.arith.path=null"]
HUB += ["mixture.sources.arith.id=org/data", "mixture.sources.arith.revision=v1"]


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str | None]]:
    """A mocked hub: model_info / dataset_info answer a fixed SHA per repo and record every look-up."""
    import huggingface_hub

    calls: list[tuple[str, str, str | None]] = []

    def info(kind: str, sha: str):
        def fn(self, repo_id: str, revision: str | None = None, **_: object) -> SimpleNamespace:
            calls.append((kind, repo_id, revision))
            return SimpleNamespace(sha=sha)

        return fn

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", info("model", MODEL_SHA))
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", info("dataset", DATA_SHA))
    return calls


def test_lock_records_versions_revisions_hashes_and_git(tmp_path: Path, hub: list) -> None:
    run = to_run_config(compose(HUB))
    freeze(run, tmp_path / "run", HUB)
    lock = json.loads((tmp_path / "run/lock.json").read_text())
    info = json.loads((tmp_path / "run/run_info.json").read_text())
    assert set(PACKAGES) | {"python", "cuda", "nvidia_driver"} <= set(lock["versions"])
    assert lock["versions"]["hydra-core"] and lock["versions"]["trl"]
    assert lock["model"]["sha"] == MODEL_SHA and lock["sources"]["arith"]["sha"] == DATA_SHA
    assert ("model", "org/model", "main") in hub and ("dataset", "org/data", "v1") in hub
    local = lock["sources"]["count"]
    assert local["sha"] is None and len(local["content_hash"]) == 16  # local data: the cache key's content hash
    text = Path(run.template.chat_template).read_text()
    assert lock["template_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert len(lock["git"]["sha"]) == 40 and isinstance(lock["git"]["dirty"], bool)
    assert info["lock"] == "lock.json" and info["git_dirty"] == lock["git"]["dirty"]


def test_offline_lock_records_null_and_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = to_run_config(compose(HUB))
    freeze(run, tmp_path / "run", [])
    lock = json.loads((tmp_path / "run/lock.json").read_text())
    assert lock["model"]["sha"] is None and "offline" in lock["model"]["unresolved"]
    assert lock["sources"]["arith"]["sha"] is None and lock["sources"]["arith"]["content_hash"]


def test_lock_reruns_the_locked_config_with_pinned_revisions(tmp_path: Path, hub: list) -> None:
    locked_run = to_run_config(compose([*HUB, "train.learning_rate=0.125"]))
    freeze(locked_run, tmp_path / "a", [])
    lock_file = tmp_path / "a/lock.json"
    lock = json.loads(lock_file.read_text())
    lock["versions"]["trl"] = "0.0.1"
    lock_file.write_text(json.dumps(lock))
    with pytest.warns(UserWarning) as record:
        run = to_run_config(compose([f"lock={tmp_path / 'a'}", "train.learning_rate=9", "mode=prepare"]))
    messages = [str(w.message) for w in record]
    assert any("trl: locked 0.0.1, installed " in m for m in messages), messages
    assert any("train.learning_rate=9.0 here, the locked run's 0.125 is used" in m for m in messages), messages
    assert not any(".revision=" in m or ": mode=" in m for m in messages), messages
    assert run.train.learning_rate == 0.125  # the locked run's config, not this command's
    assert run.mode.value == "prepare" and run.lock == str(tmp_path / "a")  # how to run stays this command's
    assert run.model.revision == MODEL_SHA and run.mixture.sources["arith"].revision == DATA_SHA
    assert run.mixture.sources["count"].revision is None
    # the new run's frozen config holds the pins; reading it back does not apply the lock again
    freeze(run, tmp_path / "b", [])
    again = load_frozen(tmp_path / "b")
    assert again.model.revision == MODEL_SHA and again.lock == str(tmp_path / "a")
    assert json.loads((tmp_path / "b/run_info.json").read_text())["locked_from"] == str(tmp_path / "a")


def test_lock_of_a_directory_without_a_run_is_a_clear_error(tmp_path: Path) -> None:
    from sft_exp.errors import ConfigError

    with pytest.raises(ConfigError, match="no run_config.yaml there"):
        to_run_config(compose([f"lock={tmp_path}"]))


@pytest.mark.slow
def test_a_locked_rerun_trains_the_same_run_again(tmp_path: Path, shared_cache: Path) -> None:
    """Two real runs: `lock=<run A>` in another directory, with a learning rate of its own that the lock overrides,
    trains A's config again: the same loss at every step and the same eval losses; it says what it overrode."""
    from tests.conftest import launch

    common = [f"cache_dir={shared_cache}", "train.max_steps=3", "train.logging_steps=1", "mixture.test_split_size=4",
              "packing.max_length=256", "eval_before_train=false"]  # fmt: skip
    a = launch([*common, f"hydra.run.dir={tmp_path}/a", "train.learning_rate=2e-3"], tmp_path)
    assert a.returncode == 0, a.stderr[-3000:]
    b = launch([f"hydra.run.dir={tmp_path}/b", f"lock={tmp_path}/a", "train.learning_rate=9e-3"], tmp_path)
    assert b.returncode == 0, b.stderr[-3000:]
    assert "train.learning_rate=0.009 here, the locked run's 0.002 is used" in b.stderr

    def losses(d: str) -> list[float]:
        state = json.loads((tmp_path / d / "trainer_state.json").read_text())
        return [h["loss"] for h in state["log_history"] if "loss" in h]

    assert len(losses("a")) == 3 and losses("b") == losses("a")
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in "ab")
    assert mb["eval_loss_after"] == ma["eval_loss_after"] and mb["trained_tokens"] == ma["trained_tokens"]
    assert json.loads((tmp_path / "b/run_info.json").read_text())["locked_from"] == str(tmp_path / "a")
