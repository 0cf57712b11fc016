"""What the launcher needs from Hydra about the job being run, read once in the composing process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from sft_exp.rundir import shell_word


@dataclass
class HydraJob:
    """What the launcher needs from Hydra about the job being run."""

    output_dir: Path  # the directory Hydra made for this job (the run directory of a new run)
    overrides: list[str]  # the job's task overrides (the command line, or one point of a sweep)
    dir_pattern: str  # hydra.run.dir (or sweep dir/subdir) before interpolation: where resume=true looks
    multirun: bool
    # hydra.launcher.cpus_per_task of a submitit launcher (None otherwise): under submitit_local, the only word on
    # how many cores a job may use (its jobs run at once, with no allocation to bind them)
    cpus_per_task: int | None = None

    @classmethod
    def current(cls) -> HydraJob:
        hc = HydraConfig.get()
        multirun = hc.mode == RunMode.MULTIRUN
        raw = OmegaConf.to_container(hc, resolve=False)
        assert isinstance(raw, dict)
        pattern = f"{raw['sweep']['dir']}/{raw['sweep']['subdir']}" if multirun else str(raw["run"]["dir"])
        cpus = (raw.get("launcher") or {}).get("cpus_per_task")
        cpus = int(cpus) if isinstance(cpus, int) or (isinstance(cpus, str) and cpus.isdigit()) else None
        return cls(Path(hc.runtime.output_dir), list(hc.overrides.task), pattern, multirun, cpus)

    def command(self, *extra: str, drop: tuple[str, ...] = ("resume=",)) -> str:
        """This job as a shell command to copy and paste: `python launch.py` + its overrides (quoted as needed, those
        starting with `drop` left out) + `extra`."""
        words = [shell_word(o) for o in self.overrides if not o.startswith(drop)]
        return " ".join(["python launch.py", *words, *extra])
