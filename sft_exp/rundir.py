"""The run directory: every file a run writes, named in one place (`RunDir`), and how to point back at it.

A run directory describes itself: the frozen resolved config (`run_config.yaml`, read by every process of the run),
the overrides and git SHA (`run_info.json`), the mixture statistics, the metrics (written last: their presence marks a
finished run), per-rank logs and the checkpoints. Only rank 0 writes. This module is a leaf: paths and names only.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from sft_exp.errors import ConfigError


@dataclass(frozen=True)
class RunDir:
    """The files of one run directory. `RunDir(path).metrics` instead of `path / "metrics.json"` everywhere.

    >>> RunDir(Path("outputs/runs/x")).frozen.name
    'run_config.yaml'
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    frozen = property(lambda self: self.path / "run_config.yaml")  # the resolved config every process reads
    info = property(lambda self: self.path / "run_info.json")  # overrides, argv, git SHA, host, start time
    metrics = property(lambda self: self.path / "metrics.json")  # written last: marks a finished run
    mixture_stats = property(lambda self: self.path / "mixture_stats.json")
    eval_before = property(lambda self: self.path / "eval_loss_before.json")  # kept so a resumed run reports it
    attempts = property(lambda self: self.path / "attempts.json")  # one line per start (host, Slurm ids, resume)
    sweep_job = property(lambda self: self.path / "sweep_job.json")  # its sweep, name and swept values
    tracking_state = property(lambda self: self.path / "tracking.json")  # the W&B run id a resumed run continues
    inspect_html = property(lambda self: self.path / "inspect.html")
    console_log = property(lambda self: self.path / "train.log")  # the whole console output of rank 0
    eval_generate = property(lambda self: self.path / "eval_generate.json")
    eval_harness = property(lambda self: self.path / "eval_harness.json")
    logs = property(lambda self: self.path / "logs")

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"rank{rank}.log"

    def checkpoint(self, step: int) -> Path:
        return self.path / f"checkpoint-{step}"

    def is_run(self) -> bool:
        return self.frozen.is_file()

    def is_finished(self) -> bool:
        return self.metrics.exists()


SWEEP_INDEX = "sweep_index.json"  # in a sweep directory: every run of the sweep with its status and results


def check_fresh(run_dir: Path) -> None:
    """A new run never writes into a directory that already holds a run (finished or not)."""
    if RunDir(run_dir).metrics.exists():
        raise ConfigError(
            f"hydra.run.dir: {run_dir} already holds a finished run (metrics.json). "
            "Choose another directory (the default is a new timestamped one); nothing there was changed"
        )
    if RunDir(run_dir).frozen.exists():
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
