"""A run's lock (<run dir>/lock.json, beside run_info.json): what it ran with, so it can be run again the same way.

    build_lock(run, fingerprint) -> dict      (written by sft_exp.config.frozen.freeze)
    apply_lock(cfg, lock_dir) -> DictConfig   (`python launch.py lock=<run dir>`: sft_exp.config.schema.to_run_config)

The lock holds: the versions of python and the stack (torch, transformers, trl, datasets, accelerate, deepspeed, peft,
hydra-core; CUDA and the driver where present); the model's and every hub source's revision resolved to a commit SHA
(huggingface_hub's `HfApi().model_info / dataset_info(..., revision=...).sha`; null offline or for local data, which
get the content hash the cache key computes instead); the sha256 of the template text; the git SHA and whether the
tree was dirty. Nothing from sft_exp is imported here (schema and frozen both use it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any

LOCK_FILE = "lock.json"
PACKAGES = ("torch", "transformers", "trl", "datasets", "accelerate", "deepspeed", "peft", "hydra-core")
# What `lock=<run dir>` takes from the current command rather than from the locked run: where and how it runs.
KEPT = ("paths", "cache_dir", "mode", "resume", "tracking", "sweep", "inspect", "lock")


def versions() -> dict[str, str | None]:
    """python and PACKAGES versions (None: not installed), CUDA (torch's build) and the NVIDIA driver where present,
    read without importing torch.

    Example:
        >>> v = versions()
        >>> v["python"] == sys.version.split()[0] and "hydra-core" in v
        True
    """
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    out["cuda"] = _torch_cuda()
    out["nvidia_driver"] = _driver()
    return out


def _torch_cuda() -> str | None:
    spec = find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    f = Path(next(iter(spec.submodule_search_locations)), "version.py")
    m = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", f.read_text() if f.exists() else "", re.M)
    return m.group(1) if m else None


def _driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def hub_offline() -> bool:
    """Whether hub look-ups are off (HF_HUB_OFFLINE)."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def resolve_revision(repo_id: str, revision: str | None, kind: str) -> tuple[str | None, str | None]:
    """(commit SHA of `revision` of a hub repo, None) or (None, why not: offline or the look-up failed).
    kind: "model" or "dataset".

    Example:
        >>> resolve_revision("HuggingFaceTB/smoltalk2", "main", "dataset")  # doctest: +SKIP
        ('a1b2...', None)
    """
    if hub_offline():
        return None, "offline (HF_HUB_OFFLINE)"
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        info = (
            api.model_info(repo_id, revision=revision)
            if kind == "model"
            else api.dataset_info(repo_id, revision=revision)
        )
        return str(info.sha) if info.sha else None, None if info.sha else "the hub returned no sha"
    except Exception as e:  # noqa: BLE001 - a lock never stops a run: the reason is recorded instead
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def dir_hash(path: str) -> str:
    """A content hash of a local file or folder: relative names, sizes and mtimes (what the cache key uses)."""
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.exists() else []
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p) if f != p else ''}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def template_text(chat_template: str | None, model_path: str | None = None) -> str | None:
    """The template text a run renders with: template.chat_template (inline or a .jinja file), else the local model's
    own (chat_template.jinja or tokenizer_config.json); None when only the hub model knows it."""
    if chat_template is not None:
        if chat_template.endswith(".jinja") and "\n" not in chat_template and Path(chat_template).exists():
            return Path(chat_template).read_text()
        return chat_template
    if model_path and os.path.isdir(model_path):
        jinja = Path(model_path, "chat_template.jinja")
        if jinja.exists():
            return jinja.read_text()
        cfg = Path(model_path, "tokenizer_config.json")
        if cfg.exists():
            value = json.loads(cfg.read_text()).get("chat_template")
            return value if isinstance(value, str) else None
    return None


def git_state(repo: Path) -> dict[str, Any]:
    """{"sha": HEAD or None, "dirty": whether tracked files differ from it (None without git)}."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()
        return {"sha": sha, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def build_lock(run: Any, fingerprint: Callable[[Any], str], repo: Path) -> dict[str, Any]:
    """The lock of a resolved RunConfig (see the module docstring). `fingerprint`: a source's content hash
    (sft_exp.data.sources.fingerprint). Hub look-ups that fail (offline) record null and why, never raise."""
    m = run.model
    local_model = os.path.isdir(m.name_or_path)
    model: dict[str, Any] = {"name_or_path": m.name_or_path, "revision": m.revision, "sha": None}
    if local_model:
        model["content_hash"] = dir_hash(m.name_or_path)
    else:
        model["sha"], why = resolve_revision(m.name_or_path, m.revision, "model")
        if why:
            model["unresolved"] = why
    sources: dict[str, Any] = {}
    for name, s in sorted(run.mixture.sources.items()):
        entry: dict[str, Any] = {"id": s.id, "path": s.path, "config": s.config, "split": s.split}
        entry.update({"revision": s.revision, "sha": None, "content_hash": fingerprint(s)})
        if s.id is not None:
            entry["sha"], why = resolve_revision(s.id, s.revision, "dataset")
            if why:
                entry["unresolved"] = why
        sources[name] = entry
    text = template_text(run.template.chat_template, m.name_or_path if local_model else None)
    return {
        "versions": versions(),
        "model": model,
        "sources": sources,
        "template_sha256": hashlib.sha256(text.encode()).hexdigest() if text is not None else None,
        "git": git_state(repo),
    }


def version_differences(locked: dict[str, Any], now: dict[str, Any] | None = None) -> list[str]:
    """'<package>: locked X, installed Y' for every version that differs.

    Example:
        >>> version_differences({"versions": {"trl": "0.1"}}, {"trl": "0.2"})
        ['trl: locked 0.1, installed 0.2']
    """
    now = versions() if now is None else now
    out = []
    for k, v in (locked.get("versions") or {}).items():
        if k in now and now[k] != v:
            out.append(f"{k}: locked {v}, installed {now[k]}")
    return out


def apply_lock(cfg: Any, lock_dir: str) -> Any:
    """The composed config `cfg` with the locked run's config (its run_config.yaml) in place of everything but KEPT,
    and the model's and hub sources' revisions pinned to the commit SHAs of its lock.json. Warns (UserWarning and
    stderr) about package versions that differ from the locked ones and about local data whose content changed.

    Raises:
        FileNotFoundError when lock_dir holds no run_config.yaml and lock.json.

    Example:
        >>> cfg = apply_lock(composed, "outputs/runs/2026-01-01_10-00-00")  # doctest: +SKIP
    """
    from omegaconf import OmegaConf

    d = Path(lock_dir).expanduser()
    frozen, lock_file = d / "run_config.yaml", d / LOCK_FILE
    for f in (frozen, lock_file):
        if not f.exists():
            raise FileNotFoundError(f"lock={lock_dir}: no {f.name} there; lock= takes the directory of a sft-exp run")
    lock = json.loads(lock_file.read_text())
    locked = OmegaConf.load(frozen)
    for k in KEPT:
        if k in cfg:
            OmegaConf.update(locked, k, cfg[k], merge=False, force_add=True)
    sha = (lock.get("model") or {}).get("sha")
    if sha:
        OmegaConf.update(locked, "model.revision", sha, merge=False)
    for name, entry in (lock.get("sources") or {}).items():
        if entry.get("sha") and name in locked.mixture.sources:
            OmegaConf.update(locked, f"mixture.sources.{name}.revision", entry["sha"], merge=False)
    for line in version_differences(lock):
        _warn(f"lock={lock_dir}: package version differs from the locked run's: {line}")
    for key, (now, then) in list(config_differences(cfg, locked).items())[:10]:
        _warn(f"lock={lock_dir}: {key}={now!r} here, the locked run's {then!r} is used")
    return locked


def config_differences(cfg: Any, locked: Any) -> dict[str, tuple[Any, Any]]:
    """Leaf keys (outside KEPT and the pinned revisions) whose value in this command's config differs from the locked
    run's: what `lock=` overrides (an override on the command line, or a default that changed since). Empty when the
    command's config cannot be resolved here.

    Example:
        >>> from omegaconf import OmegaConf
        >>> config_differences(OmegaConf.create({"train": {"lr": 5}}), OmegaConf.create({"train": {"lr": 1}}))
        {'train.lr': (5, 1)}
    """
    from omegaconf import OmegaConf

    try:
        now = OmegaConf.to_container(cfg, resolve=True)
        then = OmegaConf.to_container(locked, resolve=True)
    except Exception:  # noqa: BLE001 - a resolver only Hydra knows: nothing to compare
        return {}

    def leaves(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict):
            return {k: v for key, val in d.items() for k, v in leaves(val, f"{prefix}{key}.").items()}
        return {prefix[:-1]: d}

    a, b = leaves(now), leaves(then)
    return {
        k: (a[k], b.get(k))
        for k in a
        if k.split(".")[0] not in KEPT and not k.endswith(".revision") and k in b and a[k] != b[k]
    }


_WARNED: set[str] = set()


def _warn(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        print(f"warning: {msg}", file=sys.stderr, flush=True)
        warnings.warn(msg, UserWarning, stacklevel=3)


def check_local_content(lock: dict[str, Any], fingerprints: dict[str, str], lock_dir: str) -> list[str]:
    """Warnings for local sources whose content hash differs from the locked one (their files changed)."""
    out = []
    for name, fp in fingerprints.items():
        entry = (lock.get("sources") or {}).get(name) or {}
        if entry.get("path") and entry.get("content_hash") not in (None, fp):
            out.append(f"lock={lock_dir}: local source {name} changed since the locked run (content hash differs)")
    return out
