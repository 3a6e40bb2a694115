"""Figures of the evaluation suite, one per section of ``gpt_params.evaluation``.

Each function takes plain arrays and returns a ``matplotlib.figure.Figure`` built without pyplot (no
display, no global state; ``fig.savefig`` renders with Agg), ready to save or log to TensorBoard.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure


def _finite(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64).ravel()
    return v[np.isfinite(v)]


def _layout(fig: Figure) -> None:
    """Fixed margins: cheaper than tight_layout, which renders the figure an extra time."""
    fig.subplots_adjust(left=0.13, right=0.96, bottom=0.12, top=0.92, wspace=0.3)


def alignment_figure(prompted: np.ndarray, achieved: np.ndarray, data_range, metric: str) -> Figure:
    """Prompted vs achieved metric of every generated network, the identity line, the data's range shaded."""
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    lo, hi = (float(v) for v in data_range)
    ax.fill_between([lo, hi], lo, hi, color="tab:green", alpha=0.12, lw=0, label="data range")
    for row_p, row_a in zip(np.asarray(prompted), np.asarray(achieved)):
        ax.plot(row_p, row_a, "-", color="tab:blue", alpha=0.25, lw=0.8)
    ax.scatter(np.ravel(prompted), np.ravel(achieved), s=6, color="tab:blue", label="generated")
    both = np.concatenate([_finite(prompted), _finite(achieved), [lo, hi]])
    ends = [both.min(), both.max()]
    ax.plot(ends, ends, "k--", lw=1, label="identity")
    ax.set(xlabel=f"prompted {metric}", ylabel=f"achieved {metric}", title="Prompt alignment")
    ax.legend(loc="best", fontsize=8)
    _layout(fig)
    return fig


def one_step_figure(schemes: dict[str, dict], curves: dict[str, dict], data_best: float,
                    median_final: float | None, metric: str) -> Figure:
    """Left: the metric at init and after one generated step, per init scheme. Right: Adam / SGD curves
    (median and quartiles over networks) against the one-step level."""
    fig = Figure(figsize=(11, 4.5))
    ax = fig.add_subplot(1, 2, 1)
    names = list(schemes)
    x = np.arange(len(names))
    med = lambda n, key: np.nan if schemes[n][key]["median"] is None else schemes[n][key]["median"]
    ax.bar(x - 0.2, [med(n, "init") for n in names], 0.4, label="init")
    ax.bar(x + 0.2, [med(n, "one_step") for n in names], 0.4, label="one step")
    ax.axhline(data_best, color="tab:green", ls="--", label="data best")
    if median_final is not None:
        ax.axhline(median_final, color="tab:gray", ls=":", label="median final (training runs)")
    ax.set_xticks(x, names)
    ax.set(ylabel=f"{metric} (median)", title="One generated step from random inits")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 2, 2)
    level = None
    for name, c in curves.items():
        steps, values = np.asarray(c["steps"]), np.asarray(c["values"], dtype=np.float64)  # [E], [E, K]
        q1, med, q3 = np.nanpercentile(values, [25, 50, 75], axis=1)
        ax.plot(steps, med, label=name)
        ax.fill_between(steps, q1, q3, alpha=0.2)
        level = c["level"]
    if level is not None:
        ax.axhline(level, color="k", ls="--", label="one-step level (median)")
    ax.set(xlabel="optimizer steps", ylabel=f"{metric}", title="Optimizers from the same inits")
    if curves:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no optimizer comparison\n(task without data)", ha="center", transform=ax.transAxes)
    _layout(fig)
    return fig


def recursive_figure(values: dict[str, np.ndarray], data_best: float, metric: str) -> Figure:
    """Median metric (quartiles shaded) after each of k successive prompts, per init scheme."""
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.add_subplot()
    for name, v in values.items():
        v = np.asarray(v, dtype=np.float64)  # [k + 1, n]
        q1, med, q3 = np.nanpercentile(v, [25, 50, 75], axis=1)
        ax.plot(np.arange(len(med)), med, "o-", label=name)
        ax.fill_between(np.arange(len(med)), q1, q3, alpha=0.15)
    ax.axhline(data_best, color="tab:green", ls="--", label="data best")
    ax.set(xlabel="prompts applied (0 = init)", ylabel=metric, title="Recursive prompting")
    ax.legend(fontsize=8)
    _layout(fig)
    return fig


def novelty_figure(distances: dict[str, np.ndarray], threshold: float) -> Figure:
    """Histograms of the aligned distance to the nearest training checkpoint (log scale)."""
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    allv = np.concatenate([_finite(v) for v in distances.values()] + [[threshold]])
    pos = allv[allv > 0]
    lo = pos.min() / 2 if pos.size else 1e-6
    bins = np.geomspace(lo, max(allv.max(), lo * 10) * 1.5, 30)
    for name, v in distances.items():
        ax.hist(np.clip(_finite(v), lo, None), bins=bins, alpha=0.5, label=name)
    ax.axvline(threshold, color="k", ls="--", label="copy threshold")
    ax.set_xscale("log")
    ax.set(xlabel="aligned L2 distance to nearest training checkpoint", ylabel="networks",
           title="Novelty")
    ax.legend(fontsize=8)
    _layout(fig)
    return fig


def diversity_figure(distances: dict[str, np.ndarray], agreement: dict[str, np.ndarray]) -> Figure:
    """Pairwise aligned distances (left) and prediction agreement (right), generated vs trained."""
    fig = Figure(figsize=(10, 4.5))
    for i, (data, label) in enumerate(((distances, "pairwise aligned L2 distance"),
                                      (agreement, "pairwise prediction agreement"))):
        ax = fig.add_subplot(1, 2, i + 1)
        names = [n for n, v in data.items() if _finite(v).size]
        if names:
            ax.boxplot([_finite(data[n]) for n in names])
            ax.set_xticks(np.arange(1, len(names) + 1), names)
        else:
            ax.text(0.5, 0.5, "not available", ha="center", transform=ax.transAxes)
        ax.set(ylabel=label, title="Diversity")
    _layout(fig)
    return fig


def landscape_figure(a: np.ndarray, b: np.ndarray, values: np.ndarray, trained_xy: np.ndarray,
                     generated_xy: np.ndarray, metric: str) -> Figure:
    """Contour plot of ``values [G, G]`` over the plane coordinates ``a [G]``, ``b [G]``, with the trained
    and generated solutions' projections marked."""
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    z = np.asarray(values, dtype=np.float64)
    finite = z[np.isfinite(z)]
    if finite.size:
        levels = np.unique(np.quantile(finite, np.linspace(0, 1, 16)))
        if levels.size > 1:
            cs = ax.contourf(a, b, np.where(np.isfinite(z), z, finite.max()).T, levels=levels, cmap="viridis")
            fig.colorbar(cs, ax=ax, label=metric)
    ax.scatter(trained_xy[:, 0], trained_xy[:, 1], marker="o", facecolor="white", edgecolor="k", label="trained")
    ax.scatter(generated_xy[:, 0], generated_xy[:, 1], marker="x", color="tab:red", label="generated")
    ax.set(xlabel="PC 1", ylabel="PC 2", title=f"{metric} on the plane of aligned solutions")
    ax.legend(fontsize=8)
    _layout(fig)
    return fig
