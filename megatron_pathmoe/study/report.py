"""Collects the study's runs into the paper's tables: mean ± std over seeds per variant, and
differences to the baselines paired by seed (same seed = same data order; the initial
weights also depend on the router's shape) with their spread, so a difference can be read
against noise.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

from megatron_pathmoe.study.runner import StudyConfig
from megatron_pathmoe.study.variants import BASELINE, Variant

# The variant whose paper claims are checked, and the baselines it is checked against.
CLAIMANT = "path4"
COMPARED_TO = (BASELINE, "indep")


@dataclass(frozen=True)
class Metric:
    """One column: how to read it from a run's files, and which direction the paper favours
    for PathMoE (+1 higher, -1 lower, 0 no claim)."""

    key: str
    header: str
    read: Callable[[dict], float | None]
    fmt: str = "{:.2f}"
    claim: int = 0
    spread: bool = True  # False: the same for every seed (a parameter count)


def model_analysis(run: dict) -> dict:
    """The path analysis of a run's (only) model in its analysis/report.json."""
    return next(iter(run["analysis"]["models"].values()))


def _window2(run: dict) -> float:
    return 100 * model_analysis(run)["consistency"]["by_window"]["2"]


def _full_permutation(run: dict) -> float | None:
    sweep = model_analysis(run).get("robustness", {}).get("sweep", [])
    return sweep[-1]["degradation_percent"] if sweep and sweep[-1]["p"] == 1.0 else None


def _mean_tail(values: list[float], n: int = 20) -> float:
    return statistics.fmean(values[-n:])


TOKENS_PER_S = Metric("tokens_per_s", "tokens/s", lambda r: r["summary"]["tokens_per_second"],
                      "{:,.0f}")
QUALITY = (
    Metric("router_params", "router params", lambda r: r["summary"]["parameters"]["router"],
           "{:,.0f}", spread=False),
    Metric("valid_ppl", "held-out PPL", lambda r: r["eval"]["validation"]["perplexity"],
           claim=-1),
    Metric("train_loss", "train loss (last 20)", lambda r: _mean_tail(r["summary"]["train_losses"]),
           "{:.3f}", claim=-1),
    Metric("lambada_bpb", "LAMBADA bits/byte",
           lambda r: r["eval"]["tasks"]["lambada"]["bits_per_byte"], "{:.3f}", claim=-1),
    Metric("lambada_acc", "LAMBADA acc (%)",
           lambda r: 100 * r["eval"]["tasks"]["lambada"]["acc"], "{:.2f}", claim=+1),
    TOKENS_PER_S,
)
ROUTING = (
    Metric("path_entropy", "path entropy (bits)",
           lambda r: model_analysis(r)["path_entropy"]["entropy_bits"], claim=-1),
    Metric("usage_entropy", "per-token usage entropy, last layer (bits)",
           lambda r: model_analysis(r)["usage_entropy_bits"][-1], claim=-1),
    Metric("unique_paths", "unique paths",
           lambda r: model_analysis(r)["path_entropy"]["unique_paths"], "{:,.0f}", claim=-1),
    Metric("correlation", "consecutive-layer corr. (%)",
           lambda r: 100 * model_analysis(r)["correlation"]["mean_agreement"], "{:.1f}",
           claim=+1),
    Metric("consistency", "consistency w=2 (%)", _window2, "{:.1f}", claim=+1),
    Metric("robust_p1", "PPL increase at p=1 (%)", _full_permutation, "{:.0f}", claim=-1),
    Metric("concentration", "category concentration",
           lambda r: model_analysis(r)["categories"]["concentration"], "{:.3f}", claim=+1),
    Metric("load_cv", "load CV", lambda r: model_analysis(r)["expert_load"]["mean_cv"], "{:.2f}",
           claim=-1),
    Metric("max_violation", "MaxVio",
           lambda r: model_analysis(r)["expert_load"]["mean_max_violation"], "{:.2f}", claim=-1),
    Metric("unused_experts", "unused experts",
           lambda r: model_analysis(r)["expert_load"]["unused_experts"], "{:.1f}", claim=-1),
)
METRICS = QUALITY + ROUTING


def load_run(cfg: StudyConfig, variant: Variant, seed: int) -> dict:
    """A finished run's summary.json, eval.json and analysis/report.json."""
    run_dir = cfg.run_dir(variant, seed)
    files = {"summary": "summary.json", "eval": "eval.json",
             "analysis": os.path.join("analysis", "report.json")}
    run = {}
    for name, rel in files.items():
        path = os.path.join(run_dir, rel)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: run {variant.key} seed {seed} has not "
                                    "finished; rerun without --report-only")
        with open(path) as f:
            run[name] = json.load(f)
    return run


def metric_values(runs: dict[int, dict], metric: Metric) -> dict[int, float]:
    values = {seed: metric.read(run) for seed, run in runs.items()}
    return {seed: float(v) for seed, v in values.items() if v is not None}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(all_runs: dict[str, dict[int, dict]]) -> dict:
    """variant -> metric -> {values by seed, mean, std}; plus tokens/s relative to the
    baseline, seed by seed (runs of one seed shared the machine at the same time)."""
    out = {}
    base_speed = metric_values(all_runs[BASELINE], TOKENS_PER_S)
    for key, runs in all_runs.items():
        row = {}
        for metric in METRICS:
            values = metric_values(runs, metric)
            mean, std = mean_std(list(values.values()))
            row[metric.key] = {"by_seed": values, "mean": mean, "std": std}
        speed = row[TOKENS_PER_S.key]["by_seed"]
        ratios = {s: speed[s] / base_speed[s] for s in speed if s in base_speed}
        mean, std = mean_std(list(ratios.values()))
        row["speed_ratio"] = {"by_seed": ratios, "mean": mean, "std": std}
        out[key] = row
    return out


def paired_difference(summary: dict, metric: str, a: str, b: str) -> dict:
    """a - b seed by seed: mean, std and the per-seed differences."""
    va, vb = summary[a][metric]["by_seed"], summary[b][metric]["by_seed"]
    diffs = {s: va[s] - vb[s] for s in va if s in vb}
    mean, std = mean_std(list(diffs.values()))
    return {"by_seed": diffs, "mean": mean, "std": std}


def format_cell(stat: dict, fmt: str, spread: bool = True) -> str:
    if stat["mean"] != stat["mean"]:  # NaN: no value
        return "–"
    if len(stat["by_seed"]) < 2 or not spread:
        return fmt.format(stat["mean"])
    return f"{fmt.format(stat['mean'])} ± {fmt.format(stat['std'])}"


def _table(summary: dict, variants: list[Variant], metrics: tuple[Metric, ...],
           extra: tuple[tuple[str, str, str], ...] = ()) -> list[str]:
    headers = ["Model"] + [m.header for m in metrics] + [h for _, h, _ in extra]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" + "---:|" * (len(headers) - 1)]
    for v in variants:
        row = summary[v.key]
        cells = [format_cell(row[m.key], m.fmt, m.spread) for m in metrics]
        cells += [format_cell(row[key], fmt) for key, _, fmt in extra]
        lines.append(f"| {v.paper_name} | " + " | ".join(cells) + " |")
    return lines


def claim_checks(summary: dict) -> list[dict]:
    """For every metric with a paper direction: PathB4 minus each baseline, paired by seed,
    how many seeds went the paper's way, and the difference in units of the seed spread."""
    checks = []
    if CLAIMANT not in summary:
        return checks
    for metric in METRICS:
        if not metric.claim:
            continue
        for base in COMPARED_TO:
            if base not in summary:
                continue
            diff = paired_difference(summary, metric.key, CLAIMANT, base)
            if not diff["by_seed"]:
                continue
            held = sum(1 for d in diff["by_seed"].values() if d * metric.claim > 0)
            spread = max(summary[CLAIMANT][metric.key]["std"], summary[base][metric.key]["std"])
            checks.append({"metric": metric.key, "header": metric.header, "baseline": base,
                           "paper_direction": "higher" if metric.claim > 0 else "lower",
                           "difference": diff, "seeds_in_paper_direction": held,
                           "seeds": len(diff["by_seed"]),
                           "difference_over_seed_std": diff["mean"] / spread if spread else None,
                           "fmt": metric.fmt})
    return checks


def _claims_table(checks: list[dict], names: dict[str, str]) -> list[str]:
    lines = ["| metric | vs | paper: PathB4 is | PathB4 − baseline (paired, mean ± std) | "
             "seeds in paper's direction | difference / larger seed std |",
             "|---|---|---|---:|---:|---:|"]
    for c in checks:
        ratio = c["difference_over_seed_std"]
        lines.append(f"| {c['header']} | {names[c['baseline']]} | {c['paper_direction']} | "
                     f"{format_cell(c['difference'], c['fmt'])} | "
                     f"{c['seeds_in_paper_direction']}/{c['seeds']} | "
                     f"{'–' if ratio is None else f'{ratio:+.1f}'} |")
    return lines


def render_markdown(cfg: StudyConfig, variants: list[Variant], seeds: list[int],
                    summary: dict, checks: list[dict], command: str, plots: dict) -> str:
    s = cfg.shape
    names = {v.key: v.paper_name for v in variants}
    tokens = cfg.train_iters * cfg.global_batch_size * s.seq_length
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, "
        f"{cfg.threads_per_job} thread(s) per run; date {time.strftime('%Y-%m-%d')}.",
        f"Model: {s.num_layers} layers, d={s.hidden_size}, {s.num_attention_heads} heads / "
        f"{s.num_query_groups} KV heads, {s.num_experts} experts (FFN {s.moe_ffn_hidden_size}) "
        f"top-{s.moe_router_topk}, seq {s.seq_length}; {cfg.train_iters} iterations of "
        f"{cfg.global_batch_size} sequences ({tokens:,} tokens), lr {cfg.lr:g} → {cfg.min_lr:g} "
        f"cosine; seeds {', '.join(map(str, seeds))} (a seed fixes the data order of every "
        "variant and the initial weights; routers of other shapes draw other numbers).",
        f"Data: train `{cfg.train_data}`, held out `{cfg.valid_data}`. PPL: the whole held-out "
        f"set; LAMBADA: first {cfg.lambada_limit} items; path statistics on the first "
        f"{cfg.analysis_tokens:,} held-out tokens, robustness on {cfg.robustness_tokens:,}.",
        "",
        "Quality and cost (mean ± sample std over seeds; tokens/s ratio: per seed, against "
        f"{names[BASELINE]} of the same seed):",
        "",
        *_table(summary, variants, QUALITY, (("speed_ratio", "tokens/s vs Indep-MoE (LBL)",
                                               "{:.3f}"),)),
        "",
        "Routing (paper Appendix A; on held-out text):",
        "",
        *_table(summary, variants, ROUTING),
        "",
    ]
    if checks:
        lines += ["The paper's directions for PathB4-MoE, paired by seed:", "",
                  *_claims_table(checks, names), ""]
    if plots:
        lines += ["Plots: " + ", ".join(f"`{os.path.basename(p)}`" for p in plots.values()), ""]
    return "\n".join(lines)


def write_plots(cfg: StudyConfig, variants: list[Variant], seeds: list[int],
                all_runs: dict[str, dict[int, dict]], summary: dict) -> dict[str, str]:
    """Study plots (every variant, error bars over seeds) and the analysis figures of the
    paper's main comparison (Indep-MoE with and without LBL vs PathB4) for the first seed."""
    from megatron_pathmoe.analysis.plots import write_plots as analysis_plots

    out = os.path.join(cfg.output_dir, "plots")
    os.makedirs(out, exist_ok=True)
    plots = {"study": os.path.join(out, "study_summary.png"),
             "train_loss": os.path.join(out, "study_train_loss.png")}
    _summary_figure(variants, summary, plots["study"])
    _loss_figure(variants, all_runs, plots["train_loss"])
    main = [k for k in (BASELINE, "indep", CLAIMANT) if k in all_runs]
    reports = {key: model_analysis(all_runs[key][seeds[0]]) for key in main}
    plots.update(analysis_plots(reports, out))
    return plots


def _summary_figure(variants: list[Variant], summary: dict, path: str) -> None:
    from megatron_pathmoe.analysis.plots import pyplot, save_figure

    panels = [("valid_ppl", "held-out perplexity"), ("path_entropy", "path entropy (bits)"),
              ("correlation", "consecutive-layer correlation (%)"),
              ("robust_p1", "PPL increase at p=1 (%)"), ("load_cv", "expert-load CV")]
    fig, axes = pyplot().subplots(1, len(panels), figsize=(4 * len(panels), 4),
                                   layout="constrained")
    labels = [v.paper_name.split(" (")[0] + (" LBL" if v.key == BASELINE else "")
              for v in variants]
    for ax, (key, title) in zip(axes, panels):
        means = [summary[v.key][key]["mean"] for v in variants]
        stds = [summary[v.key][key]["std"] for v in variants]
        colors = ["tab:blue" if v.routing == "path" else "tab:gray" for v in variants]
        ax.bar(range(len(variants)), means, yerr=stds, color=colors, capsize=3)
        ax.set_xticks(range(len(variants)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        finite = [m - s for m, s in zip(means, stds) if m == m]
        if key == "valid_ppl" and finite:  # differences are small against the bar height
            ax.set_ylim(bottom=0.95 * min(finite))
    save_figure(fig, path)


def _loss_figure(variants: list[Variant], all_runs: dict, path: str) -> None:
    import numpy as np

    from megatron_pathmoe.analysis.plots import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(7, 4.5), layout="constrained")
    lowest = float("inf")
    for v in variants:
        curves = np.array([run["summary"]["train_losses"] for run in all_runs[v.key].values()])
        window = max(1, curves.shape[1] // 20)
        kernel = np.ones(window) / window
        smooth = np.array([np.convolve(c, kernel, mode="valid") for c in curves])
        x = np.arange(smooth.shape[1]) + window
        ax.plot(x, smooth.mean(0), label=v.paper_name, lw=2 if v.routing == "path" else 1)
        lowest = min(lowest, float(smooth.mean(0).min()))
    ax.set(xlabel="iteration", ylabel="training loss (mean over seeds, moving average)",
           title="Training loss")
    ax.set_ylim(top=lowest + 2.5)  # the first iterations' losses would flatten the rest
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def write_report(cfg: StudyConfig, variants: list[Variant], seeds: list[int],
                 command: str) -> str:
    """results.md, results.json and plots in ``cfg.output_dir``; returns the markdown."""
    all_runs = {v.key: {s: load_run(cfg, v, s) for s in seeds} for v in variants}
    summary = summarize(all_runs)
    checks = claim_checks(summary)
    plots = write_plots(cfg, variants, seeds, all_runs, summary)
    markdown = render_markdown(cfg, variants, seeds, summary, checks, command, plots)
    with open(os.path.join(cfg.output_dir, "results.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(cfg.output_dir, "results.json"), "w") as f:
        json.dump({"command": command, "seeds": seeds,
                   "variants": {v.key: v.paper_name for v in variants},
                   "summary": summary, "claims": checks}, f, indent=1)
    return markdown
