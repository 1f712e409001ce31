"""Reading robustness against load balance, for the medium study's report.

Permuting expert indices (the robustness metric) hands each expert the tokens another expert was
trained on, so how much it hurts depends on how unevenly experts were used, and the no-LBL runs
are the unbalanced ones. This module puts the two side by side: every (run, checkpoint) point
of p=1 degradation against load CV with their correlation, a per-variant table at the last
checkpoint, a scatter plot, and, when ``expert_drift.json`` is published next to the results
(``paper_medium.py --expert-drift``), whether the idle experts are untrained or trained.
"""

from __future__ import annotations

import math
import os

import numpy as np

from megatron_pathmoe.study.runner import split_run_name
from megatron_pathmoe.study.variants import Variant

PLOT = "robustness_vs_balance.png"
DRIFT_FILE = "expert_drift.json"  # written by paper_medium.py --expert-drift


def balance_points(values: dict, variants: list[Variant], its: tuple[int, ...]) -> list[dict]:
    """One point per (variant, seed, checkpoint) with both load CV and p=1 degradation."""
    points = []
    for v in variants:
        for it in its:
            cv, robust = values["load_cv"][v.key][it], values["robust_p1"][v.key][it]
            for seed in sorted(set(cv) & set(robust)):
                points.append({"variant": v.key, "seed": seed, "iteration": it,
                               "load_cv": cv[seed], "robust_p1": robust[seed]})
    return points


def log_degradation(percent: float) -> float:
    """log of the perplexity ratio at p=1 (the degradations span 100% to 4,000%)."""
    return math.log1p(percent / 100)


def pearson(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3 or np.std(xs) == 0 or np.std(ys) == 0:
        return None
    return float(np.corrcoef(xs, ys)[0, 1])


def robustness_vs_balance(values: dict, variants: list[Variant],
                          its: tuple[int, ...]) -> dict:
    """Points, the correlation of log degradation with load CV over all of them and within
    each checkpoint (training length moves both)."""
    points = balance_points(values, variants, its)

    def corr(sub: list[dict]) -> float | None:
        return pearson([p["load_cv"] for p in sub],
                       [log_degradation(p["robust_p1"]) for p in sub])

    return {"points": points, "correlation": corr(points), "n": len(points),
            "by_iteration": {it: {"correlation": corr([p for p in points
                                                       if p["iteration"] == it]),
                                  "n": sum(p["iteration"] == it for p in points)}
                             for it in its}}


def drift_by_variant(drift: dict | None, variants: list[Variant],
                     its: tuple[int, ...]) -> dict:
    """expert_drift.json's per-checkpoint summaries summed / averaged over each variant's
    seeds: variant -> iteration -> {runs, idle, untrained, idle_and_untrained,
    cosine_mean_idle, cosine_mean_busy} (means over runs that have such experts)."""
    out: dict = {}
    if not drift:
        return out
    for v in variants:
        for it in its:
            runs = [r["checkpoints"][str(it)]["summary"]
                    for name, r in sorted(drift["runs"].items())
                    if (split_run_name(name) or ("",))[0] == v.key
                    and str(it) in r["checkpoints"]]
            if not runs:
                continue

            def mean_of(key: str) -> float | None:
                seen = [s[key] for s in runs if s.get(key) is not None]
                return float(np.mean(seen)) if seen else None

            out.setdefault(v.key, {})[it] = {
                "runs": len(runs), "experts": sum(s["experts"] for s in runs),
                **{k: sum(s.get(k, 0) for s in runs) for k in ("idle", "untrained",
                                                              "idle_and_untrained")},
                "cosine_mean_idle": mean_of("cosine_mean_idle"),
                "cosine_mean_busy": mean_of("cosine_mean_busy")}
    return out


def _fmt(x: float | None, fmt: str = "{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def balance_section(result: dict, names: dict, its: tuple[int, ...],
                    drift: dict | None) -> list[str]:
    """The report's "Robustness and load balance" section."""
    rb, table = result["robustness_vs_balance"], result["table"]
    last = its[-1]
    lines = ["## Robustness and load balance", "",
             "Permuting expert indices hands each expert tokens another expert was trained on, "
             "so the p=1 degradation is read next to how unevenly the experts were used. "
             f"Correlation of log(1 + degradation) with load CV over every run and checkpoint: "
             f"r = {_fmt(rb['correlation'])} ({rb['n']} points); within a checkpoint: " +
             ", ".join(f"step {it:,} r = {_fmt(rb['by_iteration'][it]['correlation'])} "
                       f"({rb['by_iteration'][it]['n']})" for it in its) + f". Plot: `{PLOT}`.",
             "", f"| at step {last:,} | load CV | unused experts | PPL increase at p=1 (%) |",
             "|---|---:|---:|---:|"]
    for key in table["load_cv"]:
        cells = [table[m][key][last] for m in ("load_cv", "unused_experts", "robust_p1")]
        lines.append(f"| {names[key]} | " + " | ".join(
            "–" if not c["n"] else f"{fmt.format(c['mean'])} ± {fmt.format(c['std'])} ({c['n']})"
            for c, fmt in zip(cells, ("{:.2f}", "{:.1f}", "{:.0f}"))) + " |")
    lines.append("")
    by_variant = result.get("expert_drift") or {}
    if not by_variant:
        return lines + ["Idle experts' weights: not measured (`expert_drift.json` absent).", ""]
    lines += [
        f"Are idle experts untrained? (`expert_drift.json`; untrained: cosine to the initial "
        f"weights above {drift['untrained_cosine']}; idle: held-out load under "
        f"{drift['idle_share']:g} x uniform; counts summed over seeds, cosines averaged)", "",
        "| | " + " | ".join(f"step {it:,}" for it in its) + " |", "|---|" + "---:|" * len(its)]
    for key, per_it in by_variant.items():
        cells = []
        for it in its:
            d = per_it.get(it)
            cells.append("–" if d is None else
                         f"{d['idle']}/{d['experts']} idle, {d['untrained']} untrained; cos "
                         f"{_fmt(d['cosine_mean_idle'])} idle / {_fmt(d['cosine_mean_busy'])} busy")
        lines.append(f"| {names[key]} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_balance_plot(result: dict, variants: list[Variant], its: tuple[int, ...],
                       out_dir: str) -> str:
    """Scatter of p=1 degradation (log scale) against load CV, a colour per variant and a
    marker size per checkpoint; returns the file name."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from megatron_pathmoe.analysis.plots import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(6, 4.2), layout="constrained")
    sizes = {it: 12 + 14 * i for i, it in enumerate(its)}
    for v in variants:
        pts = [p for p in result["robustness_vs_balance"]["points"] if p["variant"] == v.key]
        if pts:
            ax.scatter([p["load_cv"] for p in pts], [1 + p["robust_p1"] / 100 for p in pts],
                       s=[sizes[p["iteration"]] for p in pts], label=v.paper_name, alpha=0.7)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="load CV (held-out, mean over layers)",
           ylabel="PPL ratio at p=1 (permuted / unpermuted)",
           title="Robustness vs load balance (larger marker: later checkpoint)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    save_figure(fig, os.path.join(out_dir, PLOT))
    return PLOT
