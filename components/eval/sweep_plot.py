"""A line plot of one metric across the evaluated models, for sweeps (e.g. loss vs keep fraction).

The evaluate stage writes it as ``<name>.png`` into its artifact, so it is logged to MLflow with
the run, and the points go into ``metrics.json``.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from components.registry import MethodParams


class SweepPlot(MethodParams):
    """``x`` maps evaluated model names to their sweep value; ``metric`` is plotted against it."""

    metric: str = Field(min_length=1, description="per-model metric on the y axis, e.g. loss_prose")
    x: dict[str, float] = Field(min_length=2, description="evaluated model -> x value, e.g. keep fraction")
    x_label: str = Field("x", min_length=1)
    name: str = Field("sweep", pattern=r"^[A-Za-z0-9_]+$", description="file name (without .png)")


def sweep_points(spec: SweepPlot, per_model: dict[str, dict]) -> list[tuple[float, float]]:
    """(x, metric) per model, sorted by x; a missing model or metric is an error naming it."""
    points = []
    for model, x in spec.x.items():
        if model not in per_model:
            raise ValueError(f"plot.x names {model!r}, which this evaluate stage did not evaluate; "
                             f"evaluated: {', '.join(sorted(per_model))}")
        if spec.metric not in per_model[model]:
            raise ValueError(f"plot.metric {spec.metric!r} is not a metric of {model}")
        points.append((float(x), float(per_model[model][spec.metric])))
    return sorted(points)


def write_sweep_plot(spec: SweepPlot, points: list[tuple[float, float]], out_dir: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    ax.set_xlabel(spec.x_label)
    ax.set_ylabel(spec.metric)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(out_dir) / f"{spec.name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
