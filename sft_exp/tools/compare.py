"""Compare runs: a table on stdout, compare.md, compare.csv and PNG plots, from a sweep, run directories or W&B.

    python -m sft_exp.tools.compare outputs/sweeps/2026-11-28/12-00-00              # a sweep (writes into it)
    python -m sft_exp.tools.compare outputs/runs/2026-11-28/10-* --out cmp/         # any run directories
    python -m sft_exp.tools.compare --wandb my-team/sft-exp --group 2026-11-28/12-00-00 --out cmp/

One row per run: the swept values, status, steps, final train loss, overall and per-source eval loss after training,
tokens/s and wall time; with eval.generate, generation metrics after training (gen_score: the mean main score over
sources, gen_stops, gen_think_ok per mode, gen_<source>: each source's main score). The best run (lowest eval loss
for `--objective all` or a source name; best generation metric for `--objective gen/<source or all>/<metric>`, in
its direction) is marked. Plots: loss_curves.png (train loss and eval loss against the optimizer step, runs
overlaid) and, for each swept key, final_eval_vs_<key>.png (final eval loss against the swept value; overall and
per source) and final_gen_vs_<key>.png (generation metrics against the swept value: overall, and each source's main
score), and with eval.harness, each lm-eval score (<task>.<metric> columns, final_harness_vs_<key>.png;
`--objective harness/<task>/<metric>`).

Swept keys come from the sweep index (what the command line or the sweeper varied); for loose run directories they
are the config keys whose resolved values differ between the runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sft_exp.config.naming import NOT_EXPERIMENT_KEY, compact, short_key
from sft_exp.eval import objective as objective_mod
from sft_exp.io import read_json
from sft_exp.rundir import RunDir, resume_arg
from sft_exp.tools.sweep_index import INDEX, load_index

# NOT_EXPERIMENT_KEY (sft_exp.config.naming): config keys that never count as "swept" when runs are diffed (names,
# paths, bookkeeping, logging / saving / eval cadence, workers: not the experiment).
__all__ = ["NOT_EXPERIMENT_KEY", "collect", "main", "run_from_wandb", "table", "write_report"]
LOSS_UNIT = "loss (nats per trained token)"


@dataclass
class RunRecord:
    name: str
    path: str
    status: str
    swept: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)  # metrics.json keys
    train_curve: list[tuple[float, float]] = field(default_factory=list)  # (step, train loss, all sources)
    eval_curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # source|all -> (step, loss)
    job: int | None = None  # the job number in its sweep
    alias: str | None = None  # set by distinct_labels when two runs' names would print the same

    @property
    def label(self) -> str:
        """The run's name in tables and legends: its swept values, or #<job> when they are too long to read."""
        if self.alias:
            return self.alias
        name = compact(self.name)
        if len(name) <= 48:
            return name
        return f"#{self.job}" if self.job is not None else name[:45] + "..."

    def eval_after(self, source: str = "all") -> float | None:
        v = (self.final.get("eval_loss_after") or {}).get(source)
        return float(v) if isinstance(v, (int, float)) else None

    def gen(self, source: str = "all", metric: str = "score") -> float | None:
        """A generation metric after training (metrics.json's eval_generate block), None when absent."""
        v = ((self.final.get("eval_generate") or {}).get(source) or {}).get(metric)
        return float(v) if isinstance(v, (int, float)) else None

    def objective(self, objective: str) -> float | None:
        """The raw value of an objective (sft_exp.eval.objective): the eval loss of `all` / a source, gen/... or
        harness/..."""
        return objective_mod.value(self.final, objective)


# ------------------------------------------------------------------------------------------------------ local runs
def _typed(v: Any) -> Any:
    if isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            return v
        return int(f) if f.is_integer() and re.fullmatch(r"[-+]?\d+", v.strip()) else f
    return v


def _flat_frozen(run_dir: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from sft_exp.train.tracking import flatten

    try:
        cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "run_config.yaml"), resolve=False)
    except (OSError, ValueError):
        return {}
    return flatten(cfg)


def _log_history(run_dir: Path) -> list[dict[str, Any]]:
    """trainer_state.json of the run, or of its latest checkpoint when the run has not finished."""
    state = read_json(run_dir / "trainer_state.json")
    if state is None:
        ckpts = sorted(run_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
        state = read_json(ckpts[-1]) if ckpts else None
    return (state or {}).get("log_history", [])


def _weighted_all(losses: dict[str, float], weights: dict[str, float]) -> float | None:
    """The eval loss over every source, weighted like train._eval_losses (trained tokens of each eval set)."""
    if not losses or not weights or set(weights) - set(losses):
        return None
    total = sum(weights.values())
    return sum(losses[n] * w for n, w in weights.items()) / total if total else None


def curves_from_history(
    rows: list[dict[str, Any]], final: dict[str, Any], step_key: str = "step", prefix: str = ""
) -> tuple[list[tuple[float, float]], dict[str, list[tuple[float, float]]]]:
    """(train curve, eval curves) from Trainer log rows (prefix "") or W&B history rows (prefix "train/", "eval/")."""
    train_loss, eval_fmt = (f"{prefix}loss", "{}_loss") if prefix else ("loss", "eval_{}_loss")
    eval_prefix = "eval/" if prefix else ""
    train: list[tuple[float, float]] = []
    per_step: dict[float, dict[str, float]] = {}
    for r in rows:
        step = r.get(step_key)
        if not isinstance(step, (int, float)):
            continue
        if isinstance(r.get(train_loss), (int, float)):
            train.append((float(step), float(r[train_loss])))
        for k, v in r.items():
            m = re.fullmatch(re.escape(eval_prefix) + eval_fmt.format("(.+)"), k)
            if m and isinstance(v, (int, float)):
                per_step.setdefault(float(step), {})[m.group(1)] = float(v)
    evals: dict[str, list[tuple[float, float]]] = {}
    before, after = final.get("eval_loss_before") or {}, final.get("eval_loss_after") or {}
    weights = final.get("eval_trained_tokens") or {}
    last = float(final["global_steps"]) if "global_steps" in final else None
    points: dict[float, dict[str, float]] = {}
    if before:
        points[0.0] = {k: float(v) for k, v in before.items()}
    for step, losses in per_step.items():
        row = dict(losses)
        total = _weighted_all(losses, weights)
        if total is not None:
            row["all"] = total
        points.setdefault(step, {}).update(row)
    if after and last is not None:
        points[last] = {k: float(v) for k, v in after.items()}  # exact values from metrics.json win
    for step in sorted(points):
        for src, v in points[step].items():
            evals.setdefault(src, []).append((step, v))
    return sorted(train), evals


def load_run(run_dir: Path, status: str | None = None, swept: dict[str, Any] | None = None) -> RunRecord:
    final = read_json(RunDir(run_dir).metrics) or {}
    job = read_json(RunDir(run_dir).sweep_job) or {}
    train, evals = curves_from_history(_log_history(run_dir), final)
    return RunRecord(
        name=job.get("name") or run_dir.name,
        path=str(run_dir),
        status=status or ("finished" if final else "unfinished"),
        swept=dict(swept or job.get("swept") or {}),
        final=final,
        train_curve=train,
        eval_curves=evals,
    )


def not_finished_reason(run_dir: Path) -> str:
    """Why a run directory has no metrics.json: `failed: <error> (<file>)` when a rank left an error file or a log
    ends on an `error:` line, else `unfinished` (running, killed, or stopped) with its last start and checkpoint."""
    rd = RunDir(run_dir)
    for err in sorted(rd.logs.glob("**/rank*.error.json")):
        data = read_json(err) or {}
        msg = data.get("message")
        if isinstance(msg, dict):
            msg = msg.get("message")
        first = next((ln for ln in str(msg or "").splitlines() if ln.strip()), "no message")
        return f"failed: {first[:200]} ({err.relative_to(run_dir)})"
    for log in sorted([*run_dir.glob("*.log"), *rd.logs.glob("**/rank*.log")]):
        try:
            tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-50:]
        except OSError:
            continue
        errors = [ln.strip() for ln in tail if ln.lstrip().startswith(("error:", "Error:")) or "Error: " in ln]
        if errors:
            return f"failed: {errors[-1][:200]} ({log.relative_to(run_dir)})"
    attempts = read_json(rd.attempts)
    started = ""
    if isinstance(attempts, list) and attempts and isinstance(attempts[-1], dict):
        last = attempts[-1]
        n = f", {len(attempts)} attempts" if len(attempts) > 1 else ""
        started = f"; last started {last.get('started', '?')} on {last.get('host', '?')}{n}"
    ckpts = sorted((p for p in run_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))  # fmt: skip
    where = f"; last checkpoint {ckpts[-1].name}, continue with python launch.py {resume_arg(run_dir)}" if ckpts else ""
    return f"unfinished (still running, killed or stopped){started}{where}"


def _config_sources(flat: dict[str, Any]) -> set[str]:
    """The mixture's source names in a flattened frozen config."""
    return {k.split(".")[2] for k in flat if k.startswith("mixture.sources.") and k.count(".") >= 3}


def _run_dirs_under(path: Path) -> list[Path]:
    return sorted(
        p.parent for p in path.rglob("run_config.yaml") if not any(x.startswith("checkpoint-") for x in p.parts)
    )


def collect(paths: list[Path], notes: list[str] | None = None) -> tuple[list[RunRecord], list[str], str]:
    """Runs from sweep directories (their index) and run directories; the swept keys; a title.

    Loose run directories without metrics.json (unfinished or failed) are skipped; what was skipped and why, and
    sources that not every run has, are appended to `notes` (one line each)."""
    notes = [] if notes is None else notes
    runs: list[RunRecord] = []
    keys: list[str] = []
    titles: list[str] = []
    loose: list[Path] = []
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist (give a sweep directory or run directories)")
        if (p / INDEX).exists():
            data = load_index(p)
            keys += [k for k in data.get("swept", []) if k not in keys]
            titles.append(data.get("group") or p.name)
            for e in sorted(data.get("runs", {}).values(), key=lambda e: (e.get("job_num") is None, e.get("job_num"))):
                rec = load_run(p / e["dir"], status=e.get("status"), swept=e.get("swept"))
                rec.name = e.get("name") or rec.name
                rec.job = e.get("job_num")
                runs.append(rec)
        elif (p / "run_config.yaml").exists():
            loose.append(p)
        else:
            found = _run_dirs_under(p)
            if not found:
                raise FileNotFoundError(
                    f"{p}: no sweep index ({INDEX}) and no run directory (run_config.yaml) under it"
                )
            loose += found
            titles.append(f"{p.name} ({len(found)} run directories)")
    for d in [d for d in loose if not RunDir(d).is_finished()]:
        notes.append(f"skipped {d}: {not_finished_reason(d)}")
        loose.remove(d)
    if loose:
        flats = {d: _flat_frozen(d) for d in loose}
        # A source that not every run has: one `mixture.sources` column (the source names), not its every field.
        per_run = {d: _config_sources(f) for d, f in flats.items()}
        shared = set.intersection(*per_run.values())
        partial = set.union(*per_run.values()) - shared
        if partial:
            for f, names in zip(flats.values(), per_run.values()):
                f["mixture.sources"] = ",".join(sorted(names))
        all_keys = sorted({k for f in flats.values() for k in f})
        # an empty map in one run, keys under it in another: those keys are diffed, not the map
        parents = {".".join(k.split(".")[:i]) for k in all_keys for i in range(1, k.count(".") + 1)}
        differing = [
            k
            for k in all_keys
            if not NOT_EXPERIMENT_KEY.match(k)
            and not (k in parents and all(f.get(k) in (None, {}, []) for f in flats.values()))
            and not (k.startswith("mixture.sources.") and k.split(".")[2] in partial)
            and len({json.dumps(f.get(k), default=str) for f in flats.values()}) > 1
        ]
        keys += [k for k in differing if k not in keys]
        for d in loose:
            rec = load_run(d)
            rec.swept = {**{k: flats[d].get(k) for k in differing}, **rec.swept}
            if not RunDir(d).sweep_job.exists():
                rec.name = ",".join(f"{short_key(k)}={_val(flats[d].get(k))}" for k in differing) or d.name
            runs.append(rec)
        if len(titles) == len([p for p in paths if (p / INDEX).exists()]):  # only explicit run directories
            titles.append(f"{len(loose)} run directories")
    # Values typed from the frozen config when it has the key (1e-3 and 0.001 are the same learning rate).
    for r in runs:
        flat = _flat_frozen(Path(r.path)) if Path(r.path).exists() else {}
        if "mixture.sources" in keys:
            flat["mixture.sources"] = ",".join(sorted(_config_sources(flat)))
        r.swept = {k: flat.get(k, _typed(r.swept.get(k))) for k in keys}
    distinct_labels(runs)
    notes += source_notes(runs)
    return runs, keys, ", ".join(titles)


def source_notes(runs: list[RunRecord]) -> list[str]:
    """A line per source that only some runs were evaluated on (their cells are blank), and what that means."""
    names = sources_of(runs)
    lines = []
    for s in names:
        missing = [r.label for r in runs if r.final.get("eval_loss_after") and s not in r.final["eval_loss_after"]]
        if missing:
            lines.append(f"source {s} is not in {len(missing)} run(s) ({', '.join(missing)}): their eval_{s} is blank")
    if lines:
        lines.append("the runs have different source sets: eval_all averages different sources, compare per source")
    return lines


def distinct_labels(runs: list[RunRecord]) -> None:
    """Two runs whose labels print the same (same swept values as printed, or names cut short) get their directory
    name appended, then as much of their path as it takes."""
    base = {id(r): r.label for r in runs}
    for depth in (1, 2, 3, 4):
        seen: dict[str, list[RunRecord]] = {}
        for r in runs:
            seen.setdefault(r.label, []).append(r)
        clashes = [rs for rs in seen.values() if len(rs) > 1]
        if not clashes:
            return
        for rs in clashes:
            for r in rs:
                tail = "/".join(Path(r.path).parts[-depth:])
                r.alias = base[id(r)] if base[id(r)] == tail else f"{base[id(r)]} [{tail}]"
    for i, r in enumerate(runs):  # the same path given twice
        if sum(x.label == r.label for x in runs) > 1:
            r.alias = f"{r.label} #{i + 1}"


# ------------------------------------------------------------------------------------------------------ W&B
def run_from_wandb(
    name: str,
    url: str,
    state: str,
    config: dict[str, Any],
    summary: dict[str, Any],
    history: list[dict[str, Any]],
) -> RunRecord:
    """A W&B run (as sft_exp.train.tracking logged it) -> RunRecord. Inputs are plain data (API or offline files)."""

    def section(prefix: str) -> dict[str, float]:
        return {k.removeprefix(prefix): v for k, v in summary.items() if k.startswith(prefix)}

    final: dict[str, Any] = {
        "eval_loss_after": section("final/eval_loss/"),
        "eval_loss_before": section("final/eval_loss_before/"),
        "train_loss_last": section("final/train_loss/"),
        "eval_trained_tokens": section("final/eval_trained_tokens/"),
    }
    for key, src in (
        ("global_steps", "final/global_steps"),
        ("train_tokens_per_second", "final/tokens_per_second"),
        ("wall_seconds", "final/wall_seconds"),
        ("packing_efficiency", "packing/efficiency"),
    ):
        if src in summary:
            final[key] = summary[src]
    gen: dict[str, dict[str, float]] = {}
    for k, v in section("final/gen/").items():  # <source>/<metric>[/<mode>] -> eval_generate block
        src, _, metric = k.partition("/")
        gen.setdefault(src, {})[metric] = v
    final["eval_generate"] = gen
    harness: dict[str, dict[str, float]] = {}
    for k, v in section("final/harness/").items():  # <task>/<metric> -> eval_harness block
        task, _, metric = k.partition("/")
        harness.setdefault(task, {})[metric] = v
    final["eval_harness"] = harness
    final = {k: v for k, v in final.items() if v not in ({}, None)}
    swept_keys = config.get("sweep.swept") or []
    train, evals = curves_from_history(history, final, step_key="train/global_step", prefix="train/")
    status = {"finished": "finished", "crashed": "failed", "failed": "failed", "running": "running"}.get(state, state)
    return RunRecord(
        name=name,
        path=url,
        status=status,
        swept={k: config.get(k) for k in swept_keys},
        final=final,
        train_curve=train,
        eval_curves=evals,
    )


def collect_wandb(path: str, group: str | None) -> tuple[list[RunRecord], list[str], str]:
    """Runs of a W&B project (entity/project), optionally one group (a sweep), through W&B's public API."""
    import wandb

    api = wandb.Api()
    runs = []
    for r in api.runs(path, filters={"group": group} if group else None):
        history = list(r.scan_history())  # every logged row: train and per-source eval losses
        summary = getattr(r.summary, "_json_dict", None) or dict(r.summary)
        runs.append(run_from_wandb(r.name, r.url, r.state, dict(r.config), dict(summary), history))
    if not runs:
        raise FileNotFoundError(f"W&B {path}: no runs" + (f" in group '{group}'" if group else ""))
    keys: list[str] = []
    for r in runs:
        keys += [k for k in r.swept if k not in keys]
    for r in runs:
        r.swept = {k: r.swept.get(k) for k in keys}
    distinct_labels(runs)
    return runs, keys, f"W&B {path}" + (f" group {group}" if group else "")


# ------------------------------------------------------------------------------------------------------ table
def sources_of(runs: list[RunRecord]) -> list[str]:
    names: list[str] = []
    for r in runs:
        names += [k for k in (r.final.get("eval_loss_after") or {}) if k != "all" and k not in names]
    return names


def gen_sources_of(runs: list[RunRecord]) -> list[str]:
    """Sources with a generation score (a scorer other than none) in any run."""
    names: list[str] = []
    for r in runs:
        block = r.final.get("eval_generate") or {}
        names += [k for k, v in block.items() if k != "all" and "score" in v and k not in names]
    return names


GEN_COLUMNS = (("gen_score", "score"), ("gen_stops", "stops"), ("gen_think_ok_think", "think_ok/think"))
GEN_COLUMNS += (("gen_think_ok_no_think", "think_ok/no_think"), ("gen_role_leak", "role_leak"))


def best_run(runs: list[RunRecord], objective: str) -> RunRecord | None:
    """The run with the lowest eval loss, or the best generation metric in its direction."""
    scored = [(r, v) for r in runs if (v := r.objective(objective)) is not None]
    return objective_mod.best(scored, objective, scored[0][0].final if scored else None)


def table(runs: list[RunRecord], keys: list[str], objective: str) -> tuple[list[str], list[list[Any]]]:
    """Header and rows (raw values) of the comparison."""
    sources = sources_of(runs)
    best = best_run(runs, objective)
    header = ["run", *[short_key(k) for k in keys], "status", "steps", "train_loss", "eval_all"]
    header += [f"eval_{s}" for s in sources]
    gen_sources = gen_sources_of(runs)
    has_gen = any(r.final.get("eval_generate") for r in runs)
    if has_gen:
        header += [c for c, _ in GEN_COLUMNS] + [f"gen_{s}" for s in gen_sources]
    harness = harness_columns(runs)
    header += [f"{t}.{m}" for t, m in harness]
    header += ["tokens_per_s", "wall_s", "best"]
    rows = []
    for r in runs:
        f = r.final
        rows.append(
            [
                r.label,
                *[r.swept.get(k) for k in keys],
                r.status,
                f.get("global_steps"),
                (f.get("train_loss_last") or {}).get("all"),
                r.eval_after("all"),
                *["" if s not in (f.get("eval_loss_after") or {s: None}) else r.eval_after(s) for s in sources],
                *([r.gen("all", m) for _, m in GEN_COLUMNS] + [r.gen(s) for s in gen_sources] if has_gen else []),
                *[r.objective(f"harness/{t}/{m}") for t, m in harness],
                f.get("train_tokens_per_second"),
                f.get("wall_seconds"),
                "*" if r is best else "",
            ]
        )
    return header, rows


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e5):
            return f"{v:.3g}"
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def _val(v: Any) -> str:
    """A swept value as written on a command line: 0.01, 2, 3e-05 (not 0.0100)."""
    return f"{v:g}" if isinstance(v, float) else _cell(v)


def _cells(header: list[str], row: list[Any]) -> list[str]:
    """Formatted cells: swept values (between 'run' and 'status') as given, throughput and time to 0.1."""
    n_swept = header.index("status") - 1
    out = []
    for i, (h, v) in enumerate(zip(header, row)):
        if 1 <= i <= n_swept:
            out.append(_val(v))
        elif h in ("tokens_per_s", "wall_s") and isinstance(v, float):
            out.append(f"{v:.1f}")
        else:
            out.append(_cell(v))
    return out


def format_text(header: list[str], rows: list[list[Any]]) -> str:
    cells = [_cells(header, r) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *cells)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells])


def format_markdown(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = ["**best**" if v == "*" else c.replace("|", "\\|") for v, c in zip(r, _cells(header, r))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ plots
def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values if v is not None)


@dataclass
class _XAxis:
    """The x axis of a plot against one swept key: numeric (log scale over a wide range) or categories."""

    key: str
    values: list[Any]

    def __post_init__(self) -> None:
        self.numeric = _numeric(self.values)
        self.cats = sorted({str(v) for v in self.values}) if not self.numeric else []
        self.span = sorted({float(v) for v in self.values if v is not None}) if self.numeric else []
        wide = bool(self.span) and self.span[0] > 0 and max(self.span) / self.span[0] >= 20
        self.log_x = wide or (bool(self.span) and self.span[0] > 0 and "learning_rate" in self.key)

    def x_of(self, r: RunRecord) -> float:
        v = r.swept.get(self.key)
        return float(v) if self.numeric else float(self.cats.index(str(v)))

    def style(self, ax: Any) -> None:
        if self.log_x:
            ax.set_xscale("log")
        if not self.numeric:
            ax.set_xticks(range(len(self.cats)), self.cats)
        elif len(self.span) <= 8 and all(f"{v:.4g}" == _val(v) for v in self.span):  # a grid: tick its values
            ax.set_xticks(self.span, [_val(v) for v in self.span])
            ax.minorticks_off()


def axis_label(key: str) -> str:
    """The swept key with what its value means."""
    if key.endswith(".weight") and key.startswith("mixture.sources."):
        return f"{key} (source weight, unit set by mixture.weighting)"
    if key.endswith("learning_rate"):
        return f"{key} (peak learning rate)"
    return key


def plot_curves(runs: list[RunRecord], objective: str, title: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_run(runs, objective)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    cmap = plt.get_cmap("tab10" if len(runs) <= 10 else "viridis")
    for i, r in enumerate(runs):
        color = cmap(i % 10) if len(runs) <= 10 else cmap(i / max(1, len(runs) - 1))
        label = r.label + (" (best)" if r is best else "") + ("" if r.status == "finished" else f" [{r.status}]")
        lw = 2.6 if r is best else 1.4
        if r.train_curve:
            xs, ys = zip(*r.train_curve)
            ax1.plot(xs, ys, color=color, lw=lw, label=label, marker="." if len(xs) < 20 else None)
        curve = r.eval_curves.get(objective, [])
        if curve:
            xs, ys = zip(*curve)
            ax2.plot(xs, ys, color=color, lw=lw, ls="--", marker="o", label=label)
    ax1.set_title("Training loss, all sources (logged every logging_steps)")
    ax2.set_title(
        f"Held-out eval loss: {'all sources' if objective == 'all' else objective} (step 0 = before training)"
    )
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(LOSS_UNIT)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(left=0)
    handles, labels = ax1.get_legend_handles_labels()
    if not handles:
        handles, labels = ax2.get_legend_handles_labels()
    if handles:
        small = len(runs) > 12
        fig.legend(handles, labels, loc="outside right upper", fontsize=6 if small else 8, title="run",
                   ncol=2 if len(runs) > 24 else 1)  # fmt: skip
    fig.suptitle(f"Loss curves: {title} ({len(runs)} runs)", fontsize=13)
    path = out / "loss_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_vs_key(runs: list[RunRecord], keys: list[str], key: str, objective: str, title: str, out: Path) -> Path:
    """Final eval loss against one swept value: overall (a line per combination of the other keys) and per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in runs if r.eval_after(objective) is not None]
    axis = _XAxis(key, [r.swept.get(key) for r in done])
    x_of, log_x = axis.x_of, axis.log_x

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    others = [k for k in keys if k != key]
    series: dict[str, list[RunRecord]] = {}
    for r in done:
        label = ", ".join(f"{short_key(k)}={_val(r.swept.get(k))}" for k in others) or "one run per value"
        series.setdefault(label, []).append(r)
    # A grid (few combinations of the other keys, several values each): a line per combination. Otherwise
    # (Optuna: every run its own combination) one point per run.
    grid = len(series) <= 8 and any(len(rs) > 1 for rs in series.values())
    if grid:
        for label, rs in sorted(series.items()):
            rs = sorted(rs, key=x_of)
            ax1.plot([x_of(r) for r in rs], [r.eval_after(objective) for r in rs], marker="o", lw=1.2, label=label)
    else:
        ax1.scatter([x_of(r) for r in done], [r.eval_after(objective) for r in done], label="one run per point")
    best = best_run(done, objective)
    if best is not None:
        ax1.scatter([x_of(best)], [best.eval_after(objective)], marker="*", s=260, color="gold", edgecolor="black",
                    zorder=5, label=f"best: {best.label}")  # fmt: skip
    # per source: the mean over the other keys' combinations at each value
    for src in sources_of(done):
        by_x: dict[float, list[float]] = {}
        for r in done:
            v = r.eval_after(src)
            if v is not None:
                by_x.setdefault(x_of(r), []).append(v)
        if by_x:
            xs = sorted(by_x)
            ax2.plot(xs, [sum(by_x[x]) / len(by_x[x]) for x in xs], marker="o", lw=1.2, label=src)
    for ax in (ax1, ax2):
        ax.set_xlabel(axis_label(key) + (" (log scale)" if log_x else ""))
        ax.set_ylabel(f"final eval {LOSS_UNIT}")
        ax.grid(alpha=0.3)
        axis.style(ax)
    ax1.set_title(f"Eval loss after training ({'all sources' if objective == 'all' else objective})")
    if not others:
        per_source = "per source"
    elif not grid:
        per_source = "per source (one point per run)"
    else:
        per_source = f"per source (mean over {', '.join(map(short_key, others))})"
    ax2.set_title(f"Eval loss after training, {per_source}")
    ax1.legend(fontsize=8, title=(", ".join(map(short_key, others)) or None) if grid else None)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=8, title="source", ncol=2 if len(sources_of(done)) > 8 else 1)
    fig.suptitle(f"Final eval loss vs {key}: {title}", fontsize=13)
    path = out / f"final_eval_vs_{_safe(key)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------------ report
def plot_gen_vs_key(runs: list[RunRecord], key: str, title: str, out: Path) -> Path | None:
    """Generation metrics after training against one swept value: the mixture-level ones (main score averaged over
    sources, stops, think_ok per mode, role_leak) and each source's main score; a point per run, the mean per value
    joined by a line. None when no run has generation metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in runs if r.final.get("eval_generate")]
    if not done:
        return None
    axis = _XAxis(key, [r.swept.get(key) for r in done])
    log_x = axis.log_x

    def draw(ax: Any, get: Any, label: str) -> None:
        _draw_vs(ax, done, axis.x_of, get, label)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    for _column, metric in GEN_COLUMNS:
        draw(ax1, lambda r, m=metric: r.gen("all", m), metric)
    for src in gen_sources_of(done):
        draw(ax2, lambda r, s=src: r.gen(s, "score"), src)
    for ax in (ax1, ax2):
        ax.set_xlabel(axis_label(key) + (" (log scale)" if log_x else ""))
        ax.set_ylabel("fraction of generated turns (role_leak: lower is better)")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        axis.style(ax)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax1.set_title("Generation after training, all sources (score: mean of each source's main score)")
    ax2.set_title("Main score per source (its scorer's metric)")
    fig.suptitle(f"Generation metrics vs {key}: {title}", fontsize=13)
    path = out / f"final_gen_vs_{_safe(key)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw_vs(ax: Any, runs: list[RunRecord], x_of: Any, get: Any, label: str) -> None:
    """One metric against a swept value: a point per run, the mean per value joined by a line."""
    by_x: dict[float, list[float]] = {}
    for r in runs:
        v = get(r)
        if v is not None:
            by_x.setdefault(x_of(r), []).append(v)
    if not by_x:
        return
    xs = sorted(by_x)
    line = ax.plot(xs, [sum(by_x[x]) / len(by_x[x]) for x in xs], marker="o", lw=1.2, label=label)[0]
    pts = [(x, v) for x in xs for v in by_x[x]]
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=10, color=line.get_color(), alpha=0.5)


def harness_columns(runs: list[RunRecord]) -> list[tuple[str, str]]:
    """(task, metric) of every lm-eval score any run reports (eval.harness), in first-seen order."""
    cols: list[tuple[str, str]] = []
    for r in runs:
        for task, metrics in (r.final.get("eval_harness") or {}).items():
            cols += [(task, m) for m in metrics if (task, m) not in cols]
    return cols


def plot_harness_vs_key(runs: list[RunRecord], key: str, title: str, out: Path) -> Path | None:
    """Every lm-eval score (eval.harness) after training against one swept value; None when no run has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in runs if r.final.get("eval_harness")]
    if not done:
        return None
    axis = _XAxis(key, [r.swept.get(key) for r in done])
    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for task, metric in harness_columns(done):
        _draw_vs(ax, done, axis.x_of, lambda r, t=task, m=metric: r.objective(f"harness/{t}/{m}"), f"{task}/{metric}")
    ax.set_xlabel(axis_label(key) + (" (log scale)" if axis.log_x else ""))
    ax.set_ylabel("score (each metric in its own direction)")
    ax.grid(alpha=0.3)
    axis.style(ax)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.suptitle(f"lm-eval scores vs {key}: {title}", fontsize=13)
    path = out / f"final_harness_vs_{_safe(key)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _shown(path: str, out: Path) -> str:
    """A run's path as compare.md shows it: relative to the report when the run lies beneath it."""
    try:
        return str(Path(path).resolve().relative_to(out.resolve()))
    except ValueError:
        return path


def write_report(
    runs: list[RunRecord],
    keys: list[str],
    objective: str,
    title: str,
    out: Path,
    plots: bool = True,
    notes: list[str] | None = None,
) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    header, rows = table(runs, keys, objective)
    written: dict[str, Path] = {}
    with open(out / "compare.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*header, "path"])
        for r, rec in zip(rows, runs):
            w.writerow(["" if v is None else v for v in r] + [rec.path])
    written["csv"] = out / "compare.csv"
    images: list[Path] = []
    if plots and runs:
        images.append(plot_curves(runs, objective, title, out))
        loss_objective = "all" if objective.startswith(objective_mod.SCORED) else objective
        for k in keys:
            if any(r.eval_after(loss_objective) is not None for r in runs):
                images.append(plot_vs_key(runs, keys, k, loss_objective, title, out))
            for plot in (plot_gen_vs_key, plot_harness_vs_key):
                image = plot(runs, k, title, out)
                if image is not None:
                    images.append(image)
    best = best_run(runs, objective)
    md = [
        f"# Comparison: {title}",
        "",
        f"{len(runs)} runs; swept: {', '.join(f'`{k}`' for k in keys) or 'nothing'}; objective: "
        + objective_mod.words(objective)
        + ".",
        "",
        f"Best: **{best.label}** ({objective} {'' if objective.startswith(objective_mod.SCORED) else 'eval loss '}"
        f"{best.objective(objective):.4f}, `{_shown(best.path, out)}`)"
        if best
        else "No run has finished with an eval loss yet.",
        "",
        "Losses in nats per trained token; `tokens_per_s` = training tokens per second; `wall_s` = the whole run.",
        "",
        *[f"- {line}" for line in notes or []],
        *([""] if notes else []),
        format_markdown(header, rows),
        "",
    ]
    md += [f"![{p.stem}]({p.name})\n" for p in images]
    (out / "compare.md").write_text("\n".join(md))
    written["md"] = out / "compare.md"
    for p in images:
        written[p.stem] = p
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m sft_exp.tools.compare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.add_argument("paths", nargs="*", type=Path, help="sweep directories and/or run directories")
    ap.add_argument("--out", type=Path, help="where compare.md/.csv and the PNGs go (default: the sweep directory "
                    "when one is given, else ./compare)")  # fmt: skip
    ap.add_argument("--objective", default="all", help="picks the best run: eval loss of all or a source name, or a "
                    "generation metric gen/<source or all>/<metric> (e.g. gen/all/score), or an lm-eval score "
                    "harness/<task>/<metric>")  # fmt: skip
    ap.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read the runs from W&B's API instead of directories")
    ap.add_argument("--group", help="with --wandb: only this group (a sweep: <date>/<time> of its directory)")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    if bool(a.paths) == bool(a.wandb):
        ap.error("give sweep/run directories, or --wandb ENTITY/PROJECT [--group G], not both")
    notes: list[str] = []
    try:
        runs, keys, title = collect_wandb(a.wandb, a.group) if a.wandb else collect(a.paths, notes)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in notes:
        print(f"note: {line}", file=sys.stderr if not runs else sys.stdout)
    if not runs:
        print("error: no finished runs found" if notes else "error: no runs found", file=sys.stderr)
        return 2
    names = sources_of(runs)
    if a.objective != "all" and a.objective not in names and not a.objective.startswith(objective_mod.SCORED):
        print(f"error: --objective {a.objective} is neither 'all' nor a source ({', '.join(names)})", file=sys.stderr)
        return 2
    out = a.out or (a.paths[0] if len(a.paths) == 1 and (a.paths[0] / INDEX).exists() else Path("compare"))
    header, rows = table(runs, keys, a.objective)
    shown = objective_mod.label(a.objective)
    print(f"{title}: {len(runs)} runs, objective {shown} (* = best)")
    print(format_text(header, rows))
    written = write_report(runs, keys, a.objective, title, out, plots=not a.no_plots, notes=notes)
    if not a.no_plots and len(a.paths) == 1 and (a.paths[0] / INDEX).exists():  # a mixture sweep: per-source plots
        from sft_exp.tools.mixsearch import compare_plots

        written.update({p.stem: p for p in compare_plots(a.paths[0], out)})
    print("\nwrote " + ", ".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
