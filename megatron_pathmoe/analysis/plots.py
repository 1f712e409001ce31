"""PNG figures comparing the reports of several models side by side (matplotlib, Agg)."""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

PLOT_FILES: dict[str, str] = {
    "coverage": "analysis_coverage.png",
    "consistency": "analysis_consistency.png",
    "usage_entropy": "analysis_usage_entropy.png",
    "robustness": "analysis_robustness.png",
    "categories": "analysis_categories.png",
    "expert_load": "analysis_expert_load.png",
}
PLOT_DESCRIPTIONS: dict[str, str] = {
    "coverage": "cumulative token coverage of the N most frequent top-1 paths (paper Fig. 4)",
    "consistency": "path consistency vs window size, and sustained-engagement run lengths "
                   "(Fig. 7)",
    "usage_entropy": "per-token expert-usage entropy over layers 1..l (Fig. 8a)",
    "robustness": "perplexity degradation vs expert-permutation probability p (Fig. 8b; "
                  "not with --robustness-tokens 0)",
    "categories": "token-category mix of the most frequent paths, one panel per model (Fig. 5)",
    "expert_load": "expert load per layer relative to uniform, one panel per model",
}


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _lines(ax, reports: dict, x_of: Callable, y_of: Callable, integer_x: bool = True) -> None:
    from matplotlib.ticker import MaxNLocator

    for label, report in reports.items():
        x, y = x_of(report), y_of(report)
        if x is not None and len(x):
            ax.plot(x, y, marker="o", markersize=3, label=label)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()


def save_figure(fig, path: str) -> None:
    """Write ``fig`` as a PNG and free it."""
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def _line_plot(reports: dict, path: str, x_of: Callable, y_of: Callable, *, xlabel: str,
               ylabel: str, title: str, integer_x: bool = True, log_x: bool = False) -> None:
    fig, ax = pyplot().subplots(figsize=(6, 4), layout="constrained")
    _lines(ax, reports, x_of, y_of, integer_x)
    if log_x:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    save_figure(fig, path)


def plot_coverage(reports: dict, path: str) -> None:
    _line_plot(reports, path, lambda r: r["coverage"]["top_n"],
               lambda r: 100 * np.asarray(r["coverage"]["fraction"]),
               xlabel="top-N most frequent paths", ylabel="tokens covered (%)",
               title="Cumulative token coverage of expert paths", integer_x=False, log_x=True)


def plot_consistency(reports: dict, path: str) -> None:
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(11, 4), layout="constrained")
    _lines(left, reports, lambda r: [int(w) for w in r["consistency"]["by_window"]],
           lambda r: 100 * np.asarray(list(r["consistency"]["by_window"].values())))
    left.set(xlabel="window (consecutive layers)", ylabel="mean Jaccard of aligned top-k sets (%)",
             title="Path consistency")
    _lines(right, reports, lambda r: np.arange(1, r["layers"] + 1),
           lambda r: 100 * np.asarray(r["engagement"]["run_length_fraction"]))
    right.set(xlabel="run length (layers with the same aligned top-1 expert)",
              ylabel="runs (%)", title="Sustained engagement")
    save_figure(fig, path)


def plot_usage_entropy(reports: dict, path: str) -> None:
    _line_plot(reports, path, lambda r: r["layer_numbers"], lambda r: r["usage_entropy_bits"],
               xlabel="layer l", ylabel="entropy of expert usage over layers 1..l (bits)",
               title="Per-token routing entropy by layer")


def plot_robustness(reports: dict, path: str) -> None:
    sweep = lambda r: r.get("robustness", {}).get("sweep", [])  # noqa: E731
    _line_plot(reports, path, lambda r: [row["p"] for row in sweep(r)],
               lambda r: [row["degradation_percent"] for row in sweep(r)],
               xlabel="probability p of permuting a layer's expert indices",
               ylabel="perplexity increase (%)", title="Routing robustness", integer_x=False)


def _heatmaps(reports: dict, path: str, matrix_of: Callable, title_of: Callable,
              xlabel: str, ylabel: str, xticks: Callable | None, colorbar: str,
              cmap: str) -> None:
    from matplotlib.ticker import MaxNLocator

    n = len(reports)
    fig, axes = pyplot().subplots(1, n, figsize=(5.5 * n, 4.5), squeeze=False,
                                   layout="constrained")
    for ax, (label, report) in zip(axes[0], reports.items()):
        matrix = matrix_of(report)
        image = ax.imshow(matrix, aspect="auto", cmap=cmap, interpolation="nearest")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(title=title_of(label, report), xlabel=xlabel, ylabel=ylabel)
        if xticks is not None:
            names = xticks(report)
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        fig.colorbar(image, ax=ax, label=colorbar)
    save_figure(fig, path)


def plot_categories(reports: dict, path: str) -> None:
    def matrix(report):
        table = np.asarray(report["categories"]["by_path"], np.float64)
        return 100 * table / np.maximum(table.sum(1, keepdims=True), 1)

    def title(label, report):
        return f"{label}: concentration {report['categories']['concentration']:.3f}"

    _heatmaps({k: r for k, r in reports.items() if r.get("categories")}, path, matrix, title,
              "token category", "path rank (most frequent first)",
              lambda r: r["categories"]["names"], "tokens of the path (%)", "viridis")


def plot_expert_load(reports: dict, path: str) -> None:
    def title(label, report):
        return f"{label}: mean MaxVio {report['expert_load']['mean_max_violation']:.2f}"

    _heatmaps(reports, path,
              lambda r: np.asarray(r["expert_load"]["load"]) * r["experts"], title,
              "expert", "MoE layer (index)", None, "load / uniform load", "magma")


PLOTTERS: dict[str, Callable[[dict, str], None]] = {
    "coverage": plot_coverage, "consistency": plot_consistency,
    "usage_entropy": plot_usage_entropy, "robustness": plot_robustness,
    "categories": plot_categories, "expert_load": plot_expert_load,
}


def write_plots(reports: dict[str, dict], out_dir: str) -> dict[str, str]:
    """Every figure of :data:`PLOT_FILES` whose data the reports hold; name -> path."""
    written = {}
    for name, plotter in PLOTTERS.items():
        if name == "robustness" and not any(r.get("robustness") for r in reports.values()):
            continue
        if name == "categories" and not any(r.get("categories") for r in reports.values()):
            continue
        path = os.path.join(out_dir, PLOT_FILES[name])
        plotter(reports, path)
        written[name] = path
    return written
