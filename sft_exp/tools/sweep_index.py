"""The sweep index: one JSON file per sweep directory listing its runs (overrides, swept values, status, final metrics).

    python -m sft_exp.tools.sweep_index outputs/sweeps/<date>/<time>            # print the index (refreshed from disk)
    python -m sft_exp.tools.sweep_index outputs/sweeps/<date>/<time> --rebuild  # rebuild it from the run directories

Who writes it, and why it survives the launcher going away:
- `SweepIndexCallback.on_multirun_start` (the launching process, before any job) writes the sweep's header: the
  command line, the sweeper and launcher, and which keys are swept (command-line sweeps and `hydra.sweeper.params`).
- Every job records itself from inside its own process (`on_job_start` -> running, `on_job_end` -> finished or
  failed with its final metrics), whatever launched it: the basic launcher, submitit on this host or a Slurm node.
  Each update is a read-modify-write under a file lock next to the index, written atomically (rename), so concurrent
  jobs never lose each other's entries and a reader never sees half a file.
- A job killed outright (SIGKILL, OOM, a node lost) cannot record its end: `load_index` reconciles on read. A run
  whose metrics.json exists is finished; a "running" run whose process is gone from this host is "died".
  `--rebuild` recreates the whole index from the run directories alone (run_info.json, metrics.json).

Only light imports here (json, filelock, hydra's callback base): it is imported by Hydra for every run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from sft_exp.config.naming import compact, short_key
from sft_exp.eval.objective import label as objective_label
from sft_exp.eval.objective import value as objective_value
from sft_exp.io import read_json, write_json
from sft_exp.rundir import SWEEP_INDEX, RunDir

INDEX = SWEEP_INDEX
FINAL_KEYS = ("eval_loss_after", "eval_loss_before", "train_loss_last", "train_loss_mean", "global_steps")
FINAL_KEYS += ("train_tokens_per_second", "packing_efficiency", "wall_seconds", "mfu")
FINAL_KEYS += ("eval_generate", "eval_generate_error")  # eval.generate: source -> metric -> value, and all
FINAL_KEYS += ("eval_harness", "eval_harness_higher_is_better", "eval_harness_error")  # eval.harness: task -> metric


# ------------------------------------------------------------------------------------------------------ helpers
def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def parse_override(text: str) -> tuple[str, str]:
    """'+train.lr=1e-3' -> ('train.lr', '1e-3'); '~key' -> ('key', '~')."""
    key, _, value = text.partition("=")
    if key.startswith("~"):
        return key.lstrip("~"), "~"
    return key.lstrip("+"), value


def run_name(swept: dict[str, str], fallback: str) -> str:
    """The tracker's run name: the swept values (short keys, compact floats), e.g. lr=0.001,arith.weight=2."""
    return ",".join(f"{short_key(k)}={compact(v)}" for k, v in swept.items()) or fallback


def group_name(sweep_dir: Path) -> str:
    """W&B group of a sweep: the last two parts of its directory (outputs/sweeps/<date>/<time> -> <date>/<time>)."""
    return "/".join(sweep_dir.resolve().parts[-2:])


def final_metrics(run_dir: Path, objective: str = "all") -> dict[str, Any] | None:
    """The compact final metrics of a finished run (None if metrics.json is absent: not finished)."""
    m = read_json(RunDir(run_dir).metrics)
    if not isinstance(m, dict):
        return None
    final = {k: m[k] for k in FINAL_KEYS if k in m}
    final["objective"] = objective_value(final, objective)
    return final


# ------------------------------------------------------------------------------------------------------ the index
class SweepIndex:
    """Read-modify-write access to <sweep_dir>/sweep_index.json under a file lock."""

    def __init__(self, sweep_dir: str | Path) -> None:
        self.dir = Path(sweep_dir).resolve()
        self.path = self.dir / INDEX

    def _lock(self) -> Any:
        from filelock import FileLock

        return FileLock(str(self.dir / f".{INDEX}.lock"), timeout=120)

    def read(self) -> dict[str, Any]:
        data = read_json(self.path)
        return data if isinstance(data, dict) else {"sweep_dir": str(self.dir), "runs": {}}

    def update(self, fn: Any) -> dict[str, Any]:
        """Apply fn(index) -> None under the lock and write the result back atomically."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            data = self.read()
            data.setdefault("runs", {})
            fn(data)
            data["updated"] = _now()
            data["runs"] = data.pop("runs")  # the header first, the (long) list of runs last
            write_json(self.path, data)
            return data

    def set_header(self, **fields: Any) -> None:
        self.update(lambda d: d.update(fields))

    def record_run(self, run_dir: str | Path, **fields: Any) -> None:
        key = self.run_key(run_dir)

        def apply(d: dict[str, Any]) -> None:
            entry = d["runs"].setdefault(key, {"dir": key})
            entry.update(fields)

        self.update(apply)

    def run_key(self, run_dir: str | Path) -> str:
        p = Path(run_dir).resolve()
        try:
            return str(p.relative_to(self.dir))
        except ValueError:
            return str(p)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_index(sweep_dir: str | Path, write: bool = True) -> dict[str, Any]:
    """The index, reconciled with the run directories (see the module docstring); written back when it changed."""
    idx = SweepIndex(sweep_dir)
    if not idx.path.exists():
        return rebuild(sweep_dir, write=write)
    data = idx.read()
    objective = data.get("objective", "all")
    changes: dict[str, dict[str, Any]] = {}
    host = socket.gethostname()
    for key, e in data.get("runs", {}).items():
        if e.get("status") in ("finished", "failed"):
            continue
        final = final_metrics(idx.dir / key, objective)
        if final is not None:
            changes[key] = {"status": "finished", "final": final, "reconciled": True}
        elif e.get("host") == host and isinstance(e.get("pid"), int) and not _pid_alive(e["pid"]):
            changes[key] = {"status": "died", "error": "its process ended without recording an end", "reconciled": True}
    for key, entry in _discover_runs(idx.dir).items():
        if key not in data.get("runs", {}):
            changes[key] = {**entry, "reconciled": True}
    header: dict[str, Any] = {}
    pid = data.get("launcher_pid")
    if data.get("status") == "running" and data.get("launcher_host") == host and isinstance(pid, int):
        if not _pid_alive(pid):  # the launcher ended without on_multirun_end (a failed job, a kill)
            header = {"status": "ended", "note": "the launching process ended before the sweep recorded its end"}

    def apply(d: dict[str, Any]) -> None:
        d.update(header)
        for k, c in changes.items():
            d.setdefault("runs", {}).setdefault(k, {"dir": k}).update(c)

    if (changes or header) and write:
        return idx.update(apply)
    apply(data)
    return data


def _discover_runs(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """Run directories under a sweep (they hold run_info.json), described from their own files."""
    out: dict[str, dict[str, Any]] = {}
    for info_path in sorted(sweep_dir.rglob("run_info.json")):
        run_dir = info_path.parent
        if any(part.startswith("checkpoint-") for part in run_dir.parts):
            continue
        info = read_json(info_path) or {}
        job = read_json(RunDir(run_dir).sweep_job) or {}
        final = final_metrics(run_dir, job.get("objective", "all"))
        out[str(run_dir.relative_to(sweep_dir))] = {
            "dir": str(run_dir.relative_to(sweep_dir)),
            "name": job.get("name", run_dir.name),
            "job_num": job.get("job_num"),
            "overrides": info.get("overrides", []),
            "swept": job.get("swept", {}),
            "status": "finished" if final is not None else "unknown",
            "started": info.get("started"),
            "final": final,
        }
    return out


def rebuild(sweep_dir: str | Path, write: bool = True) -> dict[str, Any]:
    """The index from the run directories alone (for a sweep whose index was lost or never written)."""
    idx = SweepIndex(sweep_dir)
    runs = _discover_runs(idx.dir)
    old = idx.read()
    swept: list[str] = list(old.get("swept") or [])
    for e in runs.values():
        swept += [k for k in e["swept"] if k not in swept]
    data = {"group": group_name(idx.dir), **old, "sweep_dir": str(idx.dir), "swept": swept, "runs": runs}
    data["rebuilt"] = _now()
    if write and runs:
        idx.update(lambda d: (d.clear(), d.update(data)))
    return data


# ------------------------------------------------------------------------------------------------------ job side
# ------------------------------------------------------------------------------------------------------ display
def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def format_index(data: dict[str, Any]) -> str:
    runs = sorted(data.get("runs", {}).values(), key=lambda e: (e.get("job_num") is None, e.get("job_num") or 0))
    keys = list(data.get("swept") or [])
    header = ["job", "status", *[short_key(k) for k in keys], "objective", "steps", "wall_s", "dir"]
    rows = []
    for e in runs:
        final = e.get("final") or {}
        swept = e.get("swept") or dict(parse_override(o) for o in e.get("overrides", []))
        rows.append(
            [
                _fmt(e.get("job_num")),
                e.get("status", "?"),
                *[compact(_fmt(swept.get(k))) for k in keys],
                _fmt(final.get("objective")),
                _fmt(final.get("global_steps")),
                _fmt(final.get("wall_seconds")),
                e.get("dir", ""),
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    lines = [
        f"sweep {data.get('sweep_dir', '?')}: {len(runs)} runs, status {data.get('status', '?')}, "
        f"objective {objective_label(data.get('objective', 'all'))}",
        "  ".join(h.ljust(w) for h, w in zip(header, widths)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sft_exp.tools.sweep_index", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--rebuild", action="store_true", help="rebuild the index from the run directories")
    ap.add_argument("--json", action="store_true", help="print the index as JSON")
    a = ap.parse_args(argv)
    if not a.sweep_dir.is_dir():
        print(
            f"error: {a.sweep_dir} is not a directory (give a sweep directory, e.g. outputs/sweeps/<date>/<time>)",
            file=sys.stderr,
        )
        return 2
    data = rebuild(a.sweep_dir) if a.rebuild else load_index(a.sweep_dir)
    if not data.get("runs"):
        print(f"error: no runs found under {a.sweep_dir} (no {INDEX}, no run_info.json)", file=sys.stderr)
        return 2
    print(json.dumps(data, indent=2, default=str) if a.json else format_index(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
