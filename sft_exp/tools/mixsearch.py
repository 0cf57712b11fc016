"""Close the mixture loop (RegMix-style): fit a sweep of random mixtures, learn each source's effect, propose mixtures.

    python -m sft_exp.mixsearch <sweep dir> [--objective all|<source>|gen/...|harness/...] [--propose K] [--out DIR]

Inputs, per finished run of the sweep index (sft_exp/tools/sweep_index.py): the realised share of trained tokens of
each source (its mixture_stats.json, not the requested weights) and the objective (eval loss after training, overall
or of one source, or a generation metric from metrics.json's eval_generate). Two models are fitted, ridge regression
on log-shares (numpy, always) and gradient-boosted trees (scikit-learn, when installed), and the one with the lower
leave-one-out (LOO) error is kept. Written to --out (default <sweep dir>/mixsearch):

- fit.json: the chosen model, every model's LOO RMSE / Spearman / R2 (R2 <= 0: no better than predicting the mean),
  per-source effects (the predicted change of the objective when 0.1 of share moves into the source, with its sign),
  the proposals with their predicted objective.
- sweep/proposals.yaml: the K best predicted mixtures as a sweep preset (mixture.search.points, run with
  `python launch.py --config-dir <out> sweep=proposals ...`, printed), within the sweep's share bounds and its
  token budget, and within the range of shares the sweep observed (the fit says nothing outside it).
- pred_vs_observed.png (LOO predictions), objective_vs_share.png (predicted objective against each source's share).

Too few finished runs (< MIN_RUNS) or a LOO R2 <= 0 proposes nothing and exits 1 with a line saying why.
`compare_plots` is what `python -m sft_exp.tools.compare` adds for such a sweep: per-source eval loss against the
source's realised share, and eval loss before -> after per source.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sft_exp.errors import SftExpError
from sft_exp.eval import objective as objective_mod
from sft_exp.io import read_json, write_json
from sft_exp.rundir import SWEEP_INDEX, RunDir

MIN_RUNS = 6  # finished runs below which nothing is fitted
EPS = 1e-4  # floor of a share before its log
RIDGE_ALPHAS = (0.01, 0.1, 1.0, 10.0)
N_CANDIDATES = 20_000
EFFECT_STEP = 0.1  # share moved into a source to measure its effect
SKIP_OVERRIDES = ("mixture.draw", "sweep", "sweep.trials", "mixture.total_tokens", "mixture.total_rows", "hydra.")


class MixSearchError(SftExpError):
    """A sweep that cannot be fitted (exit 2): the message names what is missing and the fix."""


@dataclass
class Study:
    """The fitting data of a mixture sweep: one row per finished run that recorded the objective."""

    sweep_dir: Path
    objective: str
    direction: str  # minimize | maximize
    sources: list[str]
    shares: np.ndarray  # (runs, sources) realised trained-token shares
    y: np.ndarray  # (runs,) objective
    runs: list[str]
    budget: dict[str, Any]  # weighting, total_tokens, total_rows
    search: dict[str, Any]  # mixture.search of the sweep (seed, alpha, min_share, max_share)
    overrides: list[str]  # the sweep's other overrides, kept for the proposals' command
    skipped: dict[str, str] = field(default_factory=dict)  # run -> why it is not used


# ------------------------------------------------------------------------------------------------------ reading
def _frozen_search(run_dir: Path) -> dict[str, Any]:
    """mixture.search and mixture.draw of a run's frozen config ({} when unreadable)."""
    try:
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.load(RunDir(run_dir).frozen))
    except Exception:  # noqa: BLE001 - a missing or old frozen config only loses the bounds
        return {}
    mix = cfg.get("mixture", {}) if isinstance(cfg, dict) else {}
    return {"search": mix.get("search") or {}, "draw": mix.get("draw")}


def load_study(sweep_dir: str | Path, objective: str | None = None) -> Study:
    """Read a mixture sweep's finished runs: realised shares (mixture_stats.json) and the objective.

    Raises:
        MixSearchError: no sweep index, no finished run, runs with different sources or budgets, a sweep not under
            weighting=proportion, or an objective that no run recorded; each message says how to fix it.
    """
    from sft_exp.data.stats import MixtureStats
    from sft_exp.tools.sweep_index import load_index

    d = Path(sweep_dir).resolve()
    if not (d / SWEEP_INDEX).exists():
        if d.is_dir() and any(RunDir(p).mixture_stats.exists() for p in d.iterdir() if p.is_dir()):
            hint = f"rebuild it from the run directories: python -m sft_exp.tools.sweep_index {d} --rebuild"
        else:
            hint = "run a sweep first: python launch.py sweep=mixture_random mixture.total_tokens=<budget>"
        raise MixSearchError(f"{d}: no {SWEEP_INDEX}, so this is not a sweep directory; {hint}")
    index = load_index(d, write=False)
    objective = objective or index.get("objective") or "all"
    entries = index.get("runs", {})
    finished = {k: e for k, e in entries.items() if e.get("status") == "finished"}
    skipped = {k: f"status {e.get('status')}" for k, e in entries.items() if e.get("status") != "finished"}
    if not finished:
        raise MixSearchError(f"{d}: none of its {len(entries)} runs finished; nothing to fit (wait for the sweep)")
    rows, ys, names, budgets, searches, seen = [], [], [], {}, {}, {}
    for key, e in sorted(finished.items(), key=lambda kv: kv[1].get("job_num", 0)):
        rd = d / key
        raw = read_json(RunDir(rd).mixture_stats)
        if not isinstance(raw, dict):
            skipped[key] = "no mixture_stats.json"
            continue
        stats = MixtureStats.from_json(raw)
        mix = stats.mixture
        budgets[key] = (mix.get("weighting"), mix.get("total_tokens"), mix.get("total_rows"))
        seen[key] = sorted(stats.sources)
        searches[key] = _frozen_search(rd).get("search", {})
        final = e.get("final") or {}
        metrics = read_json(RunDir(rd).metrics)
        if isinstance(metrics, dict):  # the whole metrics.json: eval_generate may be newer than the index entry
            keys = ("eval_loss_after", "eval_generate", "eval_harness", "eval_harness_higher_is_better")
            final = {**final, **{k: metrics[k] for k in keys if k in metrics}}
        value = objective_mod.value(final, objective)
        if value is None:
            skipped[key] = f"objective {objective} not recorded"
            continue
        shares = stats.trained_shares()
        names.append(key)
        rows.append(shares)
        ys.append(value)
    weightings = {b[0] for b in budgets.values()}
    if weightings != {"proportion"}:
        bad = sorted(k for k, b in budgets.items() if b[0] != "proportion")
        raise MixSearchError(
            f"{d}: runs {bad[:3]} were not trained with mixture.weighting=proportion: their budgets differ, so the "
            "objective mixes the effect of proportions with that of data size. Run the proxy study with "
            "sweep=mixture_random (proportion weighting, fixed mixture.total_tokens)"
        )
    if len({b[1:] for b in budgets.values()}) > 1:
        groups: dict[Any, list[str]] = {}
        for k, b in budgets.items():
            groups.setdefault(b[1:], []).append(k)
        desc = "; ".join(
            f"total_tokens={t} total_rows={r}: {len(v)} run(s), e.g. {v[0]}" for (t, r), v in groups.items()
        )
        raise MixSearchError(
            f"{d}: the runs have different token budgets ({desc}); fit one budget at a time (one sweep directory per "
            "mixture.total_tokens)"
        )
    if len({tuple(v) for v in seen.values()}) > 1:
        sets = sorted({tuple(v) for v in seen.values()})
        raise MixSearchError(f"{d}: the runs have different source sets {[list(s) for s in sets]}; fit one mixture")
    if not rows:
        recorded = sorted({k for e in finished.values() for k in (e.get("final") or {}).get("eval_loss_after") or {}})
        raise MixSearchError(
            f"{d}: no finished run recorded the objective '{objective}'. Eval losses recorded: {recorded or 'none'}; "
            "generation metrics (gen/<source>/<metric>) need eval.generate.enabled=true in the sweep, harness scores "
            "(harness/<task>/<metric>) eval.harness.tasks. Pass --objective all, --objective <source> or a recorded "
            "gen/... or harness/... metric"
        )
    sources = seen[next(iter(seen))]
    X = np.array([[r[n] for n in sources] for r in rows], dtype=float)
    b = next(iter(budgets.values()))
    search = next((s for s in searches.values() if s), {})
    overrides = [o for o in index.get("overrides", []) if not o.lstrip("+~").startswith(SKIP_OVERRIDES)]
    return Study(
        d, objective, objective_mod.direction(objective, final), sources, X, np.array(ys, dtype=float), names,
        {"weighting": b[0], "total_tokens": b[1], "total_rows": b[2]}, search, overrides, skipped,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------------ models
def features(shares: np.ndarray) -> np.ndarray:
    """log(max(share, EPS)) per source."""
    return np.log(np.maximum(shares, EPS))


class Ridge:
    """Ridge regression on standardised log-shares, alpha chosen by exact leave-one-out error (numpy only)."""

    name = "ridge_log_share"

    def __init__(self, alpha: float | None = None) -> None:
        self.alpha = alpha

    @staticmethod
    def _solve(F: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
        mu, sd = F.mean(0), F.std(0) + 1e-12
        Z = (F - mu) / sd
        ym = y.mean()
        w = np.linalg.solve(Z.T @ Z + alpha * np.eye(Z.shape[1]), Z.T @ (y - ym))
        return w, ym, mu, sd

    def fit(self, shares: np.ndarray, y: np.ndarray) -> Ridge:
        F = features(shares)
        if self.alpha is None:
            errs = {a: float(np.mean((loo_predict(Ridge(a), shares, y) - y) ** 2)) for a in RIDGE_ALPHAS}
            self.alpha = min(errs, key=lambda a: errs[a])
        self.w, self.ym, self.mu, self.sd = self._solve(F, y, self.alpha)
        return self

    def predict(self, shares: np.ndarray) -> np.ndarray:
        return ((features(shares) - self.mu) / self.sd) @ self.w + self.ym

    def describe(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "coef_per_log_share": (self.w / self.sd).tolist(), "intercept": self.ym}


class Trees:
    """scikit-learn gradient-boosted trees on the shares (RegMix's choice); small and shallow for few runs."""

    name = "gradient_boosted_trees"

    def fit(self, shares: np.ndarray, y: np.ndarray) -> Trees:
        from sklearn.ensemble import GradientBoostingRegressor

        self.model = GradientBoostingRegressor(
            n_estimators=200, max_depth=2, learning_rate=0.05, subsample=1.0, min_samples_leaf=2, random_state=0
        ).fit(shares, y)
        return self

    def predict(self, shares: np.ndarray) -> np.ndarray:
        return self.model.predict(shares)

    def describe(self) -> dict[str, Any]:
        return {"n_estimators": 200, "max_depth": 2, "learning_rate": 0.05}


def model_factories() -> list[Any]:
    """Ridge always; trees when scikit-learn imports."""
    out: list[Any] = [Ridge]
    try:
        import sklearn.ensemble  # noqa: F401

        out.append(Trees)
    except ImportError:
        pass
    return out


def loo_predict(model: Any, shares: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Leave-one-out predictions: run i predicted by the model fitted on every other run."""
    out = np.empty(len(y))
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        m = type(model)(model.alpha) if isinstance(model, Ridge) else type(model)()
        out[i] = m.fit(shares[keep], y[keep]).predict(shares[i : i + 1])[0]
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); 0 when either side is constant."""

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for v in np.unique(x):
            r[x == v] = r[x == v].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def loo_scores(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """LOO RMSE, R2 (1 - SSE / SS around the mean; <= 0: no better than the mean) and Spearman."""
    sse = float(np.sum((pred - y) ** 2))
    sst = float(np.sum((y - y.mean()) ** 2)) or 1e-12
    return {"rmse": float(np.sqrt(sse / len(y))), "r2": 1 - sse / sst, "spearman": spearman(pred, y)}


@dataclass
class Fit:
    model: Any
    scores: dict[str, dict[str, float]]  # model name -> LOO scores
    loo: np.ndarray  # the chosen model's LOO predictions


def fit_models(shares: np.ndarray, y: np.ndarray) -> Fit:
    """Fit every available model; keep the one with the lowest LOO RMSE, refitted on every run."""
    best, scores, preds = None, {}, {}
    for factory in model_factories():
        probe = factory().fit(shares, y) if factory is Ridge else factory()  # ridge picks its alpha by LOO here
        pred = loo_predict(probe, shares, y)
        scores[factory.name] = loo_scores(pred, y)
        preds[factory.name] = pred
        if best is None or scores[factory.name]["rmse"] < scores[best.name]["rmse"]:
            best = probe
    assert best is not None
    if not isinstance(best, Ridge):
        best = type(best)().fit(shares, y)
    return Fit(best, scores, preds[best.name])


# ------------------------------------------------------------------------------------------------------ proposing
def sample_mixtures(
    sources: list[str], n: int, search: dict[str, Any], lo: np.ndarray, hi: np.ndarray, seed: int = 0
) -> np.ndarray:
    """n mixtures from the sweep's Dirichlet (alpha, min/max share), kept within [lo, hi] per source."""
    rng = np.random.default_rng(seed)
    alpha = float(search.get("alpha", 1.0) or 1.0)
    mins = np.array([float((search.get("min_share") or {}).get(s, 0.0)) for s in sources])
    maxs = np.array([float((search.get("max_share") or {}).get(s, 1.0)) for s in sources])
    lo, hi = np.maximum(lo, mins), np.minimum(hi, maxs)
    x = mins + (1 - mins.sum()) * rng.dirichlet(np.full(len(sources), alpha), size=n)
    keep = ((x >= lo - 1e-12) & (x <= hi + 1e-12)).all(1)
    return x[keep]


def source_effects(model: Any, shares: np.ndarray, sources: list[str]) -> dict[str, float]:
    """Per source, the mean predicted change of the objective when EFFECT_STEP of share moves into it (taken from the
    other sources in proportion), over the observed mixtures."""
    base = model.predict(shares)
    out = {}
    for j, s in enumerate(sources):
        moved = shares * (1 - EFFECT_STEP)
        moved[:, j] += EFFECT_STEP
        out[s] = float(np.mean(model.predict(moved) - base))
    return out


def propose(study: Study, fit: Fit, k: int) -> list[dict[str, Any]]:
    """The k best predicted mixtures (shares rounded to 4 places), within the sweep's bounds and observed range."""
    lo, hi = study.shares.min(0), study.shares.max(0)
    cand = sample_mixtures(study.sources, N_CANDIDATES, study.search, lo, hi)
    if len(cand) == 0:
        return []
    pred = fit.model.predict(cand)
    order = np.argsort(pred if study.direction == "minimize" else -pred)
    out: list[dict[str, Any]] = []
    seen: set[tuple[float, ...]] = set()
    for i in order:
        key = tuple(np.round(cand[i], 2))
        if key in seen:
            continue
        seen.add(key)
        out.append(
            {"shares": {s: round(float(v), 4) for s, v in zip(study.sources, cand[i])}, "predicted": float(pred[i])}
        )
        if len(out) == k:
            break
    return out


def proposals_yaml(study: Study, proposals: list[dict[str, Any]]) -> str:
    """A `# @package _global_` sweep preset: proposal i is mixture.draw=i, under the sweep's budget."""
    import yaml

    budget = {
        k: v
        for k, v in (("total_tokens", study.budget["total_tokens"]), ("total_rows", study.budget["total_rows"]))
        if v
    }
    body = {
        "mixture": {"weighting": "proportion", **budget, "search": {"points": [p["shares"] for p in proposals]}},
        "sweep": {"trials": len(proposals), "objective": study.objective},
        "hydra": {"mode": "MULTIRUN", "sweeper": {"params": {"mixture.draw": f"range(0,{len(proposals)})"}}},
    }
    head = (
        "# @package _global_\n"
        f"# Proposals of `python -m sft_exp.mixsearch {study.sweep_dir}` (objective {study.objective}, "
        f"{study.direction}); predicted values in fit.json.\n"
        "# Run: python launch.py --config-dir <this file's folder>/.. sweep=proposals [the proxy sweep's overrides]\n"
    )
    return head + yaml.safe_dump(body, sort_keys=False)


# ------------------------------------------------------------------------------------------------------ plots
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fit(study: Study, fit: Fit, proposals: list[dict[str, Any]], out: Path) -> list[Path]:
    """pred_vs_observed.png (LOO) and objective_vs_share.png (predicted objective against each source's share)."""
    plt = _plt()
    paths = [out / "pred_vs_observed.png", out / "objective_vs_share.png"]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(study.y, fit.loo)
    lo, hi = float(min(study.y.min(), fit.loo.min())), float(max(study.y.max(), fit.loo.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    s = fit.scores[fit.model.name]
    ax.set(xlabel=f"observed {study.objective}", ylabel="leave-one-out prediction",
           title=f"{fit.model.name}: LOO R2 {s['r2']:.2f}, Spearman {s['spearman']:.2f}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    n = len(study.sources)
    cols = min(3, n)
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(4 * cols, 3.2 * -(-n // cols)), squeeze=False)
    cand = sample_mixtures(study.sources, 3000, study.search, study.shares.min(0), study.shares.max(0), seed=1)
    pred = fit.model.predict(cand) if len(cand) else np.empty(0)
    for j, src in enumerate(study.sources):
        ax = axes[j // cols][j % cols]
        if len(cand):
            ax.scatter(cand[:, j], pred, s=3, alpha=0.25, color="tab:gray", label="predicted (random mixtures)")
        ax.scatter(study.shares[:, j], study.y, color="tab:blue", label="observed runs")
        for p in proposals:
            ax.scatter([p["shares"][src]], [p["predicted"]], color="tab:red", marker="*", s=80)
        ax.set(xlabel=f"{src} share of trained tokens", ylabel=study.objective)
    for j in range(n, len(axes.flat)):
        axes.flat[j].axis("off")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths


def compare_plots(sweep_dir: str | Path, out: str | Path) -> list[Path]:
    """For `compare` on a mixture sweep (runs under weighting=proportion whose shares differ): each source's eval loss
    against its realised share (source_loss_vs_share.png) and eval loss before -> after per source
    (eval_before_after.png). [] when the directory is not such a sweep or has nothing to plot."""
    try:
        study = load_study(sweep_dir, "all")
    except MixSearchError:
        return []
    if len(study.runs) < 2:
        return []
    index = json.loads((study.sweep_dir / SWEEP_INDEX).read_text())
    finals = [(index["runs"].get(r) or {}).get("final") or {} for r in study.runs]
    plt = _plt()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n, cols = len(study.sources), min(3, len(study.sources))
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(4 * cols, 3.2 * -(-n // cols)), squeeze=False)
    for j, src in enumerate(study.sources):
        ax = axes[j // cols][j % cols]
        ys = [(f.get("eval_loss_after") or {}).get(src) for f in finals]
        pts = [(x, y) for x, y in zip(study.shares[:, j], ys) if isinstance(y, (int, float))]
        if pts:
            ax.scatter(*zip(*pts))
        ax.set(xlabel=f"{src} share of trained tokens", ylabel=f"{src} eval loss", title=src)
    for j in range(n, len(axes.flat)):
        axes.flat[j].axis("off")
    fig.tight_layout()
    p1 = out / "source_loss_vs_share.png"
    fig.savefig(p1, dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(1.2 * n + 3, 4))
    for i, f in enumerate(finals):
        before, after = f.get("eval_loss_before") or {}, f.get("eval_loss_after") or {}
        for j, src in enumerate(study.sources):
            if src in before and src in after:
                x = j + (i - len(finals) / 2) * 0.6 / max(1, len(finals))
                ax.plot([x, x], [before[src], after[src]], color="tab:gray", lw=1)
                ax.scatter([x], [after[src]], color="tab:blue", s=8)
    ax.set_xticks(range(n), study.sources)
    ax.set(ylabel="eval loss (line: before -> dot: after)", title="eval loss before -> after training, per source")
    fig.tight_layout()
    p2 = out / "eval_before_after.png"
    fig.savefig(p2, dpi=100)
    plt.close(fig)
    return [p1, p2]


# ------------------------------------------------------------------------------------------------------ the tool
def run(sweep_dir: str | Path, objective: str | None, k: int, out: str | Path | None) -> tuple[int, dict[str, Any]]:
    """Fit, write fit.json (+ proposals and plots when the fit is usable); returns (exit code, fit.json content).

    Exit 0 with proposals; 1 when too few runs or a fit no better than the mean (fit.json still says why)."""
    study = load_study(sweep_dir, objective)
    outdir = Path(out) if out else study.sweep_dir / "mixsearch"
    outdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "sweep_dir": str(study.sweep_dir), "objective": study.objective, "direction": study.direction,
        "budget": study.budget, "sources": study.sources, "runs_used": len(study.runs), "runs_skipped": study.skipped,
        "observed_best": None, "model": None, "loo": {}, "effects": {}, "proposals": [], "verdict": "",
    }  # fmt: skip
    if len(study.runs):
        i = int(np.argmin(study.y) if study.direction == "minimize" else np.argmax(study.y))
        report["observed_best"] = {
            "run": study.runs[i], "value": float(study.y[i]),
            "shares": {s: round(float(v), 4) for s, v in zip(study.sources, study.shares[i])},
        }  # fmt: skip
    if len(study.runs) < MIN_RUNS:
        report["verdict"] = (
            f"too few finished runs: {len(study.runs)} recorded {study.objective}, at least {MIN_RUNS} are needed "
            f"(more than the {len(study.sources)} sources helps); nothing proposed. Add runs: sweep.trials=<more>"
        )
        write_json(outdir / "fit.json", report)
        return 1, report
    fit = fit_models(study.shares, study.y)
    s = fit.scores[fit.model.name]
    report.update(model={"name": fit.model.name, **fit.model.describe()}, loo=fit.scores)
    effects = source_effects(fit.model, study.shares, study.sources)
    better = "lower" if study.direction == "minimize" else "higher"
    report["effects"] = {
        src: {"delta_per_0.1_share": round(v, 5), "sign": "+" if v > 0 else "-" if v < 0 else "0",
              "helps": (v < 0) == (study.direction == "minimize") and v != 0}
        for src, v in effects.items()
    }  # fmt: skip
    report["observed_vs_loo"] = {r: [float(a), float(b)] for r, a, b in zip(study.runs, study.y, fit.loo)}
    if s["r2"] <= 0:
        report["verdict"] = (
            f"the fit is no better than predicting the mean (best model {fit.model.name}: leave-one-out R2 "
            f"{s['r2']:.3f}, Spearman {s['spearman']:.2f} over {len(study.runs)} runs); nothing proposed. More runs, "
            "longer proxy runs or a less noisy objective may help"
        )
        plot_fit(study, fit, [], outdir)
        write_json(outdir / "fit.json", report)
        return 1, report
    proposals = propose(study, fit, k)
    report["proposals"] = proposals
    (outdir / "sweep").mkdir(exist_ok=True)
    (outdir / "sweep" / "proposals.yaml").write_text(proposals_yaml(study, proposals))
    report["plots"] = [str(p) for p in plot_fit(study, fit, proposals, outdir)]
    extra = " ".join(study.overrides)
    report["command"] = f"python launch.py --config-dir {outdir} sweep=proposals {extra}".strip()
    report["verdict"] = (
        f"{fit.model.name}: leave-one-out R2 {s['r2']:.3f}, Spearman {s['spearman']:.2f} over {len(study.runs)} runs; "
        f"{len(proposals)} proposal(s), {better} is better"
    )
    write_json(outdir / "fit.json", report)
    return 0, report


def main(argv: list[str] | None = None) -> int:
    """The CLI (sft_exp/mixsearch.py). Exit 0: proposals written; 1: fit not usable; 2: bad input."""
    ap = argparse.ArgumentParser(prog="python -m sft_exp.mixsearch", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir")
    ap.add_argument("--objective", default=None, help="all | <source> | gen/<source|all>/<metric> | "
                    "harness/<task>/<metric> (default: the sweep's)")  # fmt: skip
    ap.add_argument("--propose", type=int, default=3, metavar="K", help="how many mixtures to propose (default 3)")
    ap.add_argument("--out", default=None, help="output folder (default <sweep dir>/mixsearch)")
    args = ap.parse_args(argv)
    try:
        code, rep = run(args.sweep_dir, args.objective, max(1, args.propose), args.out)
    except MixSearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    out = Path(args.out) if args.out else Path(rep["sweep_dir"]) / "mixsearch"
    if rep.get("model"):
        print(f"model: {rep['model']['name']}  (leave-one-out, over {rep['runs_used']} runs)")
        for name, sc in rep["loo"].items():
            print(f"  {name:24s} RMSE {sc['rmse']:.4f}  R2 {sc['r2']:+.3f}  Spearman {sc['spearman']:+.2f}")
        print(f"effects on {rep['objective']} of +0.1 share ({rep['direction']}):")
        for src, e in rep["effects"].items():
            print(f"  {src:12s} {e['delta_per_0.1_share']:+.4f}  {'helps' if e['helps'] else 'hurts'}")
    if rep.get("observed_best"):
        ob = rep["observed_best"]
        print(f"observed best: {ob['value']:.4f}  {ob['run']}")
    for i, p in enumerate(rep["proposals"]):
        print(
            f"proposal {i}: predicted {p['predicted']:.4f}  " + " ".join(f"{k}={v:.3f}" for k, v in p["shares"].items())
        )
    print(("" if code == 0 else "no proposal: ") + rep["verdict"], file=sys.stdout if code == 0 else sys.stderr)
    print(f"fit: {out / 'fit.json'}")
    if code == 0:
        print(f"run the proposals: {rep['command']}")
    return code
