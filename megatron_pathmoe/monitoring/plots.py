"""Curves from metrics.jsonl without TensorBoard: training loss, validation perplexity,
tokens/s, and per-layer expert load and routing entropy, for one or several runs side by
side. A run may be several seeds (their curves are averaged on the iterations they share)."""

from __future__ import annotations

import argparse
import math
import os
import re
from typing import Mapping, Sequence

import numpy as np

from megatron_pathmoe.monitoring.stream import METRICS_FILE, read_metrics

Runs = Mapping[str, Sequence[str]]  # label -> run directories (or metrics.jsonl files)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def series(run_dirs: Sequence[str], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(iterations, mean over the runs) of scalar ``key``, on the iterations where every run
    has a value for it."""
    per_run = []
    for run in run_dirs:
        per_run.append({r["iteration"]: r[key] for r in read_metrics(run)
                        if r.get(key) is not None})
    common = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    values = np.array([[p[i] for i in common] for p in per_run], dtype=float)
    return np.array(common), values.mean(0) if len(common) else np.array([])


def moving_average(x: np.ndarray, y: np.ndarray, window: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Trailing moving average (``window`` None: a twentieth of the points)."""
    window = max(1, len(y) // 20) if window is None else max(1, window)
    if window == 1 or len(y) < window:
        return x, y
    return x[window - 1:], np.convolve(y, np.ones(window) / window, mode="valid")


def plot_loss(runs: Runs, path: str, smooth: int | None = None) -> str:
    """Training loss ("lm loss") per run, moving-averaged; the y range spans at most 2.5 nats
    above the lowest point so the first iterations do not flatten the rest."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    lowest = math.inf
    for label, dirs in runs.items():
        x, y = moving_average(*series(dirs, "lm loss"), smooth)
        if len(y):
            ax.plot(x, y, label=label)
            lowest = min(lowest, float(y.min()))
    if math.isfinite(lowest):
        ax.set_ylim(top=min(ax.get_ylim()[1], lowest + 2.5))  # cut, never extend
    _finish(ax, "iteration", "training loss (nats/token)", "Training loss")
    return _save(fig, path)


def plot_scalar(runs: Runs, key: str, path: str, *, ylabel: str, title: str,
                log_y: bool = False) -> str:
    """One scalar per run against iterations; sparse series (validation) get markers."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for label, dirs in runs.items():
        x, y = series(dirs, key)
        ax.plot(x, y, marker="o" if len(x) <= 40 else None, ms=3, label=label)
    if log_y:
        ax.set_yscale("log")
    _finish(ax, "iteration", ylabel, title)
    return _save(fig, path)


def _layer_keys(run_dirs: Sequence[str], prefix: str) -> list[str]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)$")
    found = {k for run in run_dirs for r in read_metrics(run) for k in r if pattern.match(k)}
    return sorted(found, key=lambda k: int(pattern.match(k).group(1)))


def plot_layers(runs: Runs, path: str) -> str:
    """A grid, one column per run: expert load max and min vs uniform per layer (top) and
    routing entropy per layer as a fraction of ln(experts) (bottom); shared y axes."""
    plt = _pyplot()
    rows = (("moe/expert_load_max_layer_", "expert load vs uniform\n(max solid, min dashed)"),
            ("moe/routing_entropy_layer_", "routing entropy / ln(E)"))
    fig, axes = plt.subplots(2, len(runs), figsize=(4.2 * len(runs) + 1, 6.5), sharey="row",
                             squeeze=False, layout="constrained")
    for col, (label, dirs) in enumerate(runs.items()):
        for row, (prefix, ylabel) in enumerate(rows):
            ax = axes[row][col]
            keys = _layer_keys(dirs, prefix)
            colors = plt.cm.viridis(np.linspace(0, 0.9, max(1, len(keys))))
            for key, color in zip(keys, colors):
                layer = key.rsplit("_", 1)[1]
                ax.plot(*series(dirs, key), color=color, label=f"L{layer}")
                if row == 0:
                    ax.plot(*series(dirs, key.replace("_max_", "_min_")), color=color, ls="--")
            if row == 0:
                ax.axhline(1.0, color="gray", lw=0.8)
                ax.set_title(label)
            ax.set(xlabel="iteration", ylabel=ylabel if col == 0 else None)
            ax.grid(alpha=0.3)
        axes[1][col].legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_runs(runs: Runs, out_dir: str, smooth: int | None = None) -> list[str]:
    """All the figures for ``runs`` into ``out_dir``; returns the PNG paths written."""
    os.makedirs(out_dir, exist_ok=True)
    out = lambda name: os.path.join(out_dir, name)  # noqa: E731
    paths = [plot_loss(runs, out("loss.png"), smooth),
             plot_scalar(runs, "lm loss validation ppl", out("valid_perplexity.png"),
                         ylabel="validation perplexity", title="Validation perplexity",
                         log_y=True),
             plot_scalar(runs, "tokens-per-second", out("tokens_per_second.png"),
                         ylabel="tokens/s", title="Throughput"),
             plot_layers(runs, out("expert_load_entropy.png"))]
    return paths


def _finish(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plot_metrics.py",
        description="Plot training loss, validation perplexity, tokens/s and per-layer "
        f"expert load / routing entropy from the {METRICS_FILE} of one or several runs "
        "(side by side) into PNGs; no TensorBoard needed.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help=f"a run directory holding {METRICS_FILE} (or the file itself); "
                        "LABEL=DIR names the run, and runs with the same LABEL (seeds) are "
                        "averaged")
    parser.add_argument("--out", required=True, metavar="DIR", help="write the PNGs here")
    parser.add_argument("--smooth", type=int, default=None, metavar="N",
                        help="moving-average window of the loss curve in log intervals "
                        "(default: a twentieth of the points; 1: raw)")
    return parser


def parse_runs(specs: Sequence[str]) -> dict[str, list[str]]:
    """``[LABEL=]DIR`` arguments -> label -> directories; errors name the bad argument."""
    runs: dict[str, list[str]] = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = os.path.basename(os.path.normpath(spec)), spec
        metrics = path if path.endswith(".jsonl") else os.path.join(path, METRICS_FILE)
        if not os.path.isfile(metrics):
            raise SystemExit(f"plot_metrics.py: {spec}: no {metrics}; pass a run directory "
                             "written with the metrics stream on")
        runs.setdefault(label, []).append(path)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for path in plot_runs(parse_runs(args.runs), args.out, args.smooth):
        print(path)
    return 0
