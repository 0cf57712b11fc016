"""The run directory describes itself: frozen resolved config, overrides, git SHA, stats, metrics.

The process that composed the config freezes it here once (`run_config.yaml`); every other process (ranks, Slurm
tasks, a requeued job) reads that file and never composes again. Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sft_exp.config import RunConfig, dump_run_config, to_run_config

FROZEN = "run_config.yaml"
REPO_ROOT = Path(__file__).resolve().parent.parent


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


_claimed: dict[str, str] = {}


def claim_dir(base: str) -> str:
    """${claim_dir:<path>} for hydra.run.dir: `base`, or `base-1`, `base-2`, ... when a run started in the same second
    (or anything else) already holds it. The directory is created here, atomically (mkdir fails if it exists), so two
    processes started together never share one: Hydra would otherwise write the second run's .hydra/ over the first's.
    Memoised: Hydra resolves hydra.run.dir several times in one process and must get the same answer."""
    if base not in _claimed:
        Path(base).parent.mkdir(parents=True, exist_ok=True)
        for n in range(10_000):
            candidate = base if n == 0 else f"{base}-{n}"
            try:
                os.mkdir(candidate)
            except FileExistsError:
                continue
            _claimed[base] = candidate
            break
        else:
            raise FileExistsError(f"hydra.run.dir: {base} and 10,000 numbered variants exist")
    return _claimed[base]


def write_json(path: Path, obj: Any) -> None:
    """Write then rename, so a reader (or a crash) never sees half a file. A failed write (disk full, permissions)
    raises sft_exp.checkpoints.SaveFailed naming the file; `path` keeps its previous content."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        from sft_exp.checkpoints import SaveFailed

        with contextlib.suppress(OSError):  # only our own half-written temporary file
            tmp.unlink(missing_ok=True)
        raise SaveFailed(f"{path.name} write", path, path.parent, e.errno, e) from e


def check_fresh(run_dir: Path) -> None:
    """A new run never writes into a directory that already holds a run (finished or not)."""
    from sft_exp.config import ConfigError

    if (run_dir / "metrics.json").exists():
        raise ConfigError(
            f"hydra.run.dir: {run_dir} already holds a finished run (metrics.json). "
            "Choose another directory (the default is a new timestamped one); nothing there was changed"
        )
    if (run_dir / FROZEN).exists():
        raise ConfigError(
            f"hydra.run.dir: {run_dir} already holds an unfinished run. "
            f"Continue it with {resume_arg(run_dir)}, or choose another directory; nothing there was changed"
        )


_SHELL_SAFE = re.compile(r"[\w@%+=:,./-]+")
_HYDRA_SAFE = re.compile(r"[\w@%+:./-]*")


def shell_word(s: str) -> str:
    """`s` as one word of a shell command to copy and paste (quoted only when it must be)."""
    if _SHELL_SAFE.fullmatch(s):
        return s
    if "'" not in s:
        return f"'{s}'"
    if not any(c in s for c in '"$`\\!'):
        return f'"{s}"'
    return shlex.quote(s)


def resume_arg(run_dir: Path | str) -> str:
    """The `resume=<run dir>` argument for a shell command. A sweep's run directories are named after the overrides
    (`lr=1e-3,seed=1`): unquoted, Hydra would read the `=` and `,` as override syntax, so the path is quoted for Hydra
    (and the whole for the shell)."""
    path = str(run_dir)
    if _HYDRA_SAFE.fullmatch(path):
        return shell_word(f"resume={path}")
    # Inside Hydra's quotes a backslash is literal except before a quote (or the closing quote): double those.
    quoted = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", path)
    quoted = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, quoted)
    return shell_word(f"resume='{quoted}'")


def freeze(run: RunConfig, run_dir: Path, overrides: list[str]) -> None:
    """Write the resolved config and the run's description into a fresh run directory."""
    check_fresh(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FROZEN).write_text(dump_run_config(run))
    write_json(
        run_dir / "run_info.json",
        {
            "git_sha": git_sha(),
            "overrides": overrides,
            "argv": sys.argv,
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": sys.version.split()[0],
        },
    )


def load_frozen(run_dir: Path) -> RunConfig:
    from omegaconf import OmegaConf

    path = Path(run_dir) / FROZEN
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a sft-exp run directory?")
    return to_run_config(OmegaConf.load(path))


def cache_dir(run: RunConfig) -> Path:
    return Path(run.cache_dir) if run.cache_dir else REPO_ROOT / "outputs" / "cache"
