"""The figures of an evaluate stage's report: perplexity by domain, size against quality, claims,
and the training curves of the evaluated models that were trained.

Each function draws one PNG from the stage's ``metrics.json`` content and returns its path,
or None when the report has nothing to draw (one model, no sizes, no claims).
"""
from __future__ import annotations

from pathlib import Path

VERDICT_COLORS = {"PASS": "tab:green", "FAIL": "tab:red", "NOT DISCRIMINATING": "tab:orange"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def perplexity_by_domain(per_model: dict[str, dict], domains: list[str], path: Path) -> Path | None:
    """Grouped bars: one group per domain, one bar per model (log scale: perplexities span decades)."""
    domains = [d for d in domains if any(f"ppl_{d}" in m for m in per_model.values())]
    if not domains:
        return None
    plt = _pyplot()
    models = list(per_model)
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(domains) + 0.25 * len(models)), 3.8))
    for i, name in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(domains))]
        ys = [per_model[name].get(f"ppl_{d}", float("nan")) for d in domains]
        ax.bar(xs, ys, width=width, label=name)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (test split)")
    ax.legend(fontsize=6, ncol=max(1, len(models) // 8), loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the points no other point beats on both axes (smaller size, lower perplexity)."""
    front = []
    for name, (size, ppl) in points.items():
        dominated = any(s <= size and p <= ppl and (s, p) != (size, ppl) for s, p in points.values())
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: points[n][0])


def size_against_quality(per_model: dict[str, dict], path: Path, metric: str = "ppl_all") -> Path | None:
    """Deployed bytes against ``metric``, the Pareto front joined by a line."""
    points = {n: (float(m["size_bytes"]), float(m[metric])) for n, m in per_model.items()
              if m.get("size_bytes") and metric in m}
    if len(points) < 2:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    front = pareto_front(points)
    for name, (size, value) in points.items():
        ax.scatter(size / 1e6, value, color="tab:blue" if name in front else "tab:gray", zorder=3)
        ax.annotate(name, (size / 1e6, value), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.plot([points[n][0] / 1e6 for n in front], [points[n][1] for n in front], color="tab:blue", alpha=0.5,
            label="Pareto front")
    ax.set_xlabel("deployed size (MB)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def claims_against_bars(claims: list[dict], path: Path) -> Path | None:
    """Each claim's slack relative to its bar (> 0 clears it; a perplexity claim's log slack is
    relative already), with the 95% interval where seeds gave one, colored by verdict; accounting claims are hatched."""
    rows = [c for c in claims if c.get("slack") is not None and c.get("rhs")]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(rows) + 1.2))
    for i, c in enumerate(rows):
        scale = 1.0 if c.get("slack_scale") == "log" else abs(c["rhs"])  # a log slack is already relative
        rel = c["slack"] / scale
        ax.barh(i, rel, color=VERDICT_COLORS.get(c["verdict"], "tab:gray"),
                hatch="//" if c.get("kind") == "accounting" else None, edgecolor="black", linewidth=0.4)
        if c.get("slack_interval"):
            low, high = (v / scale for v in c["slack_interval"])
            ax.errorbar(rel, i, xerr=[[rel - low], [high - rel]], color="black", capsize=3, linewidth=1)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [c["name"] for c in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("slack / |bar|, or ln(bar / ppl) for perplexity  (> 0 clears the bar)")
    ax.set_title("green PASS, red FAIL, orange NOT DISCRIMINATING; hatched: accounting", fontsize=7)
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path)


def training_curves(curves: dict[str, dict], path: Path) -> Path | None:
    """Training loss by step, one line per trained model, side by side on one axis.

    ``curves``: {model: {"steps": [...], "loss": [...]}} as training stages record them
    (``loss_curve.json`` in the model artifact); models without one (quantized, merged) are absent.
    A stage with ``monitor_every`` adds ``"validation": {domain: [[step, loss], ...]}``, drawn dashed."""
    curves = {name: c for name, c in curves.items() if c.get("steps")}
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, curve in curves.items():
        line, = ax.plot(curve["steps"], curve["loss"], label=name, linewidth=1.0)
        for domain, points in sorted((curve.get("validation") or {}).items()):
            ax.plot([s for s, _ in points], [v for _, v in points], linestyle="--", linewidth=0.8,
                    color=line.get_color(), label=f"{name}: held-out {domain}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (dashed: held-out, per domain)")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def checkpoint_sweep(per_model: dict[str, dict], domains: list[str], path: Path) -> Path | None:
    """One panel per capability (perplexity per domain, arithmetic exact match): each model that has
    kept checkpoints as a line over the fraction of its training, its final model at 1."""
    sweeps: dict[str, list[tuple[float, dict]]] = {}
    for m in per_model.values():
        if "checkpoint_of" in m:
            sweeps.setdefault(m["checkpoint_of"], []).append((m["checkpoint_fraction"], m))
    sweeps = {name: sorted(points, key=lambda p: p[0]) + [(1.0, per_model[name])]
              for name, points in sweeps.items() if name in per_model}
    if not sweeps:
        return None
    capabilities = [f"ppl_{d}" for d in domains] + ["arith_exact_match", "exact_match"]
    capabilities = [c for c in capabilities if any(c in m for points in sweeps.values() for _, m in points)]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(capabilities), figsize=(3.2 * len(capabilities), 3.2), squeeze=False)
    for ax, capability in zip(axes[0], capabilities):
        for name, points in sweeps.items():
            xs = [f for f, m in points if m.get(capability) is not None]
            ax.plot(xs, [m[capability] for _, m in points if m.get(capability) is not None], marker="o", label=name)
        if capability.startswith("ppl_"):
            ax.set_yscale("log")
        ax.set_title(capability)
        ax.set_xlabel("fraction of training")
    axes[0][0].legend(fontsize="small")
    return _save(fig, path)


def rank_correlation(entry: dict, path: Path) -> Path | None:
    """One rank agreement or correlation (``tasks/evaluate.py``): its first two columns' scores,
    one point per run, labelled by the run the first column reads, with rho in the title (a
    partial rho says so: the axes show the raw scores)."""
    values, runs = entry["values"], entry["runs"]
    if len(values) < 2 or not runs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    ax.scatter(values[0], values[1])
    for run, x, y in zip(runs, values[0], values[1]):
        ax.annotate(run.split(" / ")[0], (x, y), fontsize="x-small", xytext=(3, 3), textcoords="offset points")
    ax.margins(x=0.2, y=0.1)  # room for the labels of the extreme points
    ax.set_xlabel(entry["columns"][0])
    ax.set_ylabel(entry["columns"][1])
    partial = "partial " if "raw_spearman" in entry["result"] else ""
    ax.set_title(f"{partial}Spearman rho {entry['result']['spearman']:.3g}", fontsize="medium")
    return _save(fig, path)


def stability_grid(groups: dict[str, dict], path: Path) -> Path | None:
    """Heat map of the unstable share of runs per stability group (rows) and peak learning rate
    (columns), seeds pooled (``components/eval/stability.py``)."""
    if not groups:
        return None
    import numpy as np

    plt = _pyplot()
    lrs = sorted({d["lr"] for g in groups.values() for d in g["runs_detail"].values() if d["lr"] is not None})
    columns = lrs or [None]
    grid = np.full((len(groups), len(columns)), np.nan)
    for row, group in enumerate(groups.values()):
        for col, lr in enumerate(columns):
            cell = [d["unstable"] for d in group["runs_detail"].values() if d["lr"] == lr]
            if cell:
                grid[row, col] = float(np.mean(cell))
    fig, ax = plt.subplots(figsize=(2.0 + 1.1 * len(columns), 1.4 + 0.45 * len(groups)))
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="Reds", aspect="auto")
    ax.set_xticks(range(len(columns)), [f"{lr:g}" if lr is not None else "?" for lr in columns])
    ax.set_yticks(range(len(groups)), list(groups))
    ax.set_xlabel("peak learning rate")
    for (row, col), value in np.ndenumerate(grid):
        if value == value:  # not nan
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="unstable share of runs")
    return _save(fig, path)
