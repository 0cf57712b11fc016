"""Run and sweep directory names: `${claim_dir:}` (hydra.run.dir) and `${run_dirname:}` (hydra.sweep.subdir)."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from pathlib import Path
from typing import Any

LONG_FLOAT = re.compile(r"\d*\.\d{5,}(?:[eE][-+]?\d+)?")  # Optuna's samples: 0.5939321535345923


# Top-level keys that never change what is trained: a resume may change them, compare does not take them as swept, and
# Hydra leaves them out of sweep run directory names (conf/hydra/default.yaml's exclude_keys; a test keeps them agreed).
NOT_EXPERIMENT = ("cache_dir", "paths", "sweep", "tracking", "resume", "launcher", "inspect", "experiment")
# Keys inside the experiment's groups that do not change what is trained either: logging, saving, eval cadence,
# reporting, data-loading workers (fnmatch patterns). compare does not take them as swept.
NOT_EXPERIMENT_KEYS = (
    "train.logging_*",
    "train.save_*",
    "train.eval_strategy",
    "train.eval_steps",
    "train.per_device_eval_batch_size",
    "train.report_to",
    "train.dataloader_num_workers",
    "train.extra.logging_*",
    "train.extra.save_*",
    "train.extra.eval_*",
    "train.extra.dataloader_num_workers",
    "train.extra.dataloader_pin_memory",
    "train.extra.dataloader_persistent_workers",
    "train.extra.dataloader_prefetch_factor",
    "eval.generate.when",
    "eval.generate.every_steps",
    "eval.generate.batch_size",
    "eval.generate.samples",
)
NOT_EXPERIMENT_KEY = re.compile(
    "|".join(
        [rf"^({'|'.join(map(re.escape, NOT_EXPERIMENT))})(\.|$)", *(fnmatch.translate(p) for p in NOT_EXPERIMENT_KEYS)]
    )
)

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


def short_key(key: str) -> str:
    """A label for plots and run names: mixture.sources.arith.weight -> arith.weight, train.learning_rate -> lr."""
    key = key.removeprefix("mixture.sources.").removeprefix("train.")
    return {"learning_rate": "lr"}.get(key, key)


def compact(value: Any) -> str:
    """Optuna's 0.5939321535345923 -> 0.5939 (for names and tables; the exact value stays in the overrides)."""
    return LONG_FLOAT.sub(lambda m: f"{float(m.group()):.4g}", str(value))


MAX_DIRNAME = 200  # a file name may have 255 bytes


def run_dirname(override_dirname: str, job_num: Any = None) -> str:
    """A sweep run's directory name: its overrides (hydra.job.override_dirname), as they are when short.

    A name that would not fit a file name (255 bytes), or holds Optuna's 16-digit floats, is compacted: short keys,
    floats to 4 significant digits, prefixed with the job number so names stay unique (the exact values are in the
    run's .hydra/overrides.yaml and the sweep index); a path in a value never nests directories.
    """
    name = str(override_dirname).replace("/", "_") or f"job{job_num}"
    if len(name) <= MAX_DIRNAME and not LONG_FLOAT.search(name):
        return name
    parts = []
    for item in str(override_dirname).split(","):
        key, eq, value = item.partition("=")
        value = compact(value)
        parts.append(f"{short_key(key)}{eq}{value}".replace("/", "_"))
    name = f"{job_num}_" + ",".join(parts)
    if len(name) > MAX_DIRNAME:
        digest = hashlib.sha1(str(override_dirname).encode()).hexdigest()[:8]
        name = f"{name[: MAX_DIRNAME - 9]}-{digest}"
    return name
