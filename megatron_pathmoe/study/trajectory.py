"""The medium study's report: every metric at every evaluated checkpoint, the PathB4 − baseline
differences paired by seed, a verdict per paper direction computed from those numbers, and
trajectory plots. Works on partial results (a missing run is shown as missing) and reads only
the published results directory, so it rebuilds byte for byte from the committed files.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass

from megatron_pathmoe.study.balance import (
    DRIFT_FILE, balance_section, drift_by_variant, robustness_vs_balance, write_balance_plot)
from megatron_pathmoe.study.report import METRICS, Metric, format_cell, mean_std, model_analysis
from megatron_pathmoe.study.robustness_recheck import DRAWS, RECHECK_FILE, TOKENS
from megatron_pathmoe.study.runner import StudyConfig, iteration_folder
from megatron_pathmoe.study.variants import Variant

CLAIMANT = "path4"


def _top_path_coverage(run: dict) -> float:
    analysis = model_analysis(run)
    return 100 * sum(p["tokens"] for p in analysis["top_paths"]) / analysis["tokens"]


# The category concentration is computed over the most frequent paths only; how many tokens those
# paths hold differs tenfold between routings, so it is shown next to it.
TOP_PATH_COVERAGE = Metric("top_path_coverage", "tokens on the 20 most frequent paths (%)",
                           _top_path_coverage, "{:.1f}")
# Metrics read from one checkpoint's evaluation and analysis (the summary-only ones, train loss
# and tokens/s, describe the end of training and are reported separately).
TRAJECTORY_METRICS = tuple(m for m in METRICS if m.key in (
    "valid_ppl", "lambada_bpb", "path_entropy", "usage_entropy", "unique_paths", "correlation",
    "consistency", "robust_p1", "concentration")) + (TOP_PATH_COVERAGE,) + tuple(
    m for m in METRICS if m.key in ("load_cv", "max_violation", "unused_experts"))


def _recheck(run: dict, key: str) -> float | None:
    return (run.get("recheck") or {}).get(key)


def _worst_over_median(run: dict) -> float | None:
    draws = _recheck(run, "draw_perplexities")
    return None if not draws else max(draws) / statistics.median(draws)


# The denser robustness measurement of the final checkpoints (robustness_recheck.py), when run:
# judged on the median draw, since one permutation can cost a hundred times more than the rest.
RECHECK_METRICS = (
    Metric("robust_p1_recheck", f"PPL increase at p=1, median of {DRAWS} draws on {TOKENS:,} "
           "tokens (%)", lambda r: _recheck(r, "median_degradation_percent"), "{:.0f}",
           claim=-1),
    Metric("robust_p1_recheck_mean", f"PPL increase at p=1, mean of the {DRAWS} draws' PPL "
           "(the study's definition) (%)", lambda r: _recheck(r, "degradation_percent"),
           "{:.0f}", claim=-1),
    Metric("robust_p1_draw_tail", "p=1 PPL of the worst draw / the median draw",
           _worst_over_median, "{:.1f}"),
)
REPORTED_METRICS = TRAJECTORY_METRICS + RECHECK_METRICS
COMPARISONS = (("path4", "indep_aux"), ("path4", "indep"), ("path4_aux", "indep_aux"))
T_THRESHOLD = 2.0  # |mean paired difference| / its standard error counted as outside the noise


@dataclass(frozen=True)
class Direction:
    """One of the paper's claims for PathB4 (no LBL): a deciding metric and its baseline."""

    name: str
    metric: str
    baseline: str
    also: tuple[str, ...] = ()  # metrics shown alongside, not deciding
    # Trend on the relative gap (a / b − 1): a perplexity gap shrinks with perplexity itself.
    relative: bool = False


DIRECTIONS = (
    Direction("perplexity at least as good as Indep-MoE (LBL)", "valid_ppl", "indep_aux",
              ("lambada_bpb",), relative=True),
    Direction("balanced load without the aux loss (vs Indep-MoE without it)", "load_cv", "indep",
              ("max_violation", "unused_experts")),
    Direction("higher cross-layer consistency", "consistency", "indep_aux", ("correlation",)),
    Direction("lower routing entropy", "usage_entropy", "indep_aux", ("path_entropy",)),
    Direction("more robust to expert permutation (p=1)", "robust_p1", "indep_aux"),
)
METRIC_BY_KEY = {m.key: m for m in REPORTED_METRICS}


def _json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_checkpoints(cfg: StudyConfig, variant: Variant, seed: int) -> dict[int, dict]:
    """iteration -> {"summary", "eval", "analysis", "recheck"} for every checkpoint whose
    evaluation and analysis are published (recheck: None unless re-measured); {} for a run not
    (fully) there."""
    summary = _json(os.path.join(cfg.result_dir(variant, seed), "summary.json"))
    if summary is None:
        return {}
    out = {}
    for it in cfg.checkpoint_iterations:
        folder = os.path.join(cfg.result_dir(variant, seed), iteration_folder(it))
        ev, an = _json(os.path.join(folder, "eval.json")), \
            _json(os.path.join(folder, "analysis", "report.json"))
        if ev is not None and an is not None:
            out[it] = {"summary": summary, "eval": ev, "analysis": an,
                       "recheck": _json(os.path.join(folder, RECHECK_FILE))}
    return out


def collect(cfg: StudyConfig, variants: list[Variant], seeds: list[int]) -> dict:
    """values[metric][variant][iteration][seed] of every published run; runs' summaries."""
    values: dict = {m.key: {v.key: {it: {} for it in cfg.checkpoint_iterations} for v in variants}
                    for m in REPORTED_METRICS}
    summaries: dict = {v.key: {} for v in variants}
    machines: dict = {}
    for v in variants:
        for s in seeds:
            note = os.path.join(cfg.result_dir(v, s), "machine.txt")
            if os.path.exists(note):
                machines[f"{v.key}_seed{s}"] = open(note).read().strip()
            for it, run in load_checkpoints(cfg, v, s).items():
                summaries[v.key][s] = run["summary"]
                for m in REPORTED_METRICS:
                    value = m.read(run)
                    if value is not None:
                        values[m.key][v.key][it][s] = float(value)
    return {"values": values, "summaries": summaries, "machines": machines}


def _stat(by_seed: dict[int, float]) -> dict:
    mean, std = mean_std(list(by_seed.values()))
    return {"by_seed": by_seed, "mean": mean, "std": std, "n": len(by_seed)}


def paired(values: dict, metric: Metric, a: str, b: str, it: int,
           relative: bool = False) -> dict:
    """a − b at one checkpoint (``relative``: 100 (a / b − 1), in %), seed by seed, with how
    many seeds went the paper's way."""
    va, vb = values[metric.key].get(a, {}).get(it, {}), values[metric.key].get(b, {}).get(it, {})
    stat = _stat({s: 100 * (va[s] / vb[s] - 1) if relative else va[s] - vb[s]
                  for s in sorted(va) if s in vb})
    stat["in_paper_direction"] = sum(1 for d in stat["by_seed"].values() if d * metric.claim > 0)
    return stat


def _standard_error(stat: dict) -> float:
    return stat["std"] / math.sqrt(stat["n"]) if stat["n"] > 1 else float("inf")


def judge(metric: Metric, stat: dict) -> str:
    """holds / reverses / inside the noise: every seed on one side and the mean at least
    T_THRESHOLD standard errors from zero; fewer than 2 seeds: not enough seeds."""
    if stat["n"] < 2:
        return "not enough seeds"
    gap = stat["mean"] * metric.claim  # > 0: the paper's way
    if gap > T_THRESHOLD * _standard_error(stat) and stat["in_paper_direction"] == stat["n"]:
        return "holds"
    if -gap > T_THRESHOLD * _standard_error(stat) and stat["in_paper_direction"] == 0:
        return "reverses"
    return "inside the noise"


def trend(first: dict, last: dict) -> str:
    """Whether |gap| grows or shrinks from the first to the last checkpoint: a change larger
    than T_THRESHOLD times the larger standard error of the two."""
    if first["n"] < 2 or last["n"] < 2:
        return "trend unknown"
    change = abs(last["mean"]) - abs(first["mean"])
    noise = T_THRESHOLD * max(_standard_error(first), _standard_error(last))
    if change > noise:
        return "gap grows"
    if -change > noise:
        return "gap shrinks"
    return "gap about constant"


def verdicts(values: dict, iterations: tuple[int, ...]) -> list[dict]:
    """Each direction judged at the last checkpoint with >= 2 paired seeds; its trend from the
    first such checkpoint (on the relative gap where the direction says so)."""
    out = []
    for d in DIRECTIONS:
        metric = METRIC_BY_KEY[d.metric]
        stats = {it: paired(values, metric, CLAIMANT, d.baseline, it) for it in iterations}
        judged = [it for it in iterations if stats[it]["n"] >= 2]
        last = judged[-1] if judged else iterations[-1]
        trended = ({it: paired(values, metric, CLAIMANT, d.baseline, it, relative=True)
                    for it in iterations} if d.relative else stats)
        out.append({"direction": d.name, "metric": d.metric, "baseline": d.baseline,
                    "iteration": last, "verdict": judge(metric, stats[last]),
                    "trend": trend(trended[judged[0]], trended[last]) if judged
                    else "trend unknown",
                    "difference": stats[last],
                    "first_iteration": judged[0] if judged else None,
                    "first_difference": stats[judged[0]] if judged else None,
                    "relative": {"first": trended[judged[0]], "last": trended[last]}
                    if d.relative and judged else None})
    return out


def recheck_verdict(values: dict, iterations: tuple[int, ...]) -> dict | None:
    """The robustness direction judged again on the re-measured degradation, at the last
    checkpoint re-measured for >= 2 paired seeds; None where there is none."""
    metric = METRIC_BY_KEY["robust_p1_recheck"]
    baseline = next(d.baseline for d in DIRECTIONS if d.metric == "robust_p1")
    for it in reversed(iterations):
        stat = paired(values, metric, CLAIMANT, baseline, it)
        if stat["n"] >= 2:
            return {"iteration": it, "baseline": baseline, "verdict": judge(metric, stat),
                    "difference": stat}
    return None


def summarize(cfg: StudyConfig, variants: list[Variant], seeds: list[int]) -> dict:
    """Everything the markdown, plots and results.json show."""
    data = collect(cfg, variants, seeds)
    keys = {v.key for v in variants}
    values, its = data["values"], cfg.checkpoint_iterations
    table = {m.key: {v.key: {it: _stat(values[m.key][v.key][it]) for it in its} for v in variants}
             for m in REPORTED_METRICS}
    diffs = {m.key: {f"{a}-{b}": {it: paired(values, m, a, b, it) for it in its}
                     for a, b in COMPARISONS if a in keys and b in keys}
             for m in REPORTED_METRICS}
    speed = {v.key: _stat({s: r["tokens_per_second"] for s, r in data["summaries"][v.key].items()
                           if r.get("tokens_per_second")}) for v in variants}
    finished = {v.key: sorted(data["summaries"][v.key]) for v in variants}
    judged = {CLAIMANT, "indep_aux", "indep"} <= keys
    return {"table": table, "differences": diffs, "tokens_per_second": speed,
            "finished": finished, "machines": data["machines"],
            "verdicts": verdicts(values, its) if judged else [],
            "recheck": recheck_verdict(values, its) if judged else None,
            "robustness_vs_balance": robustness_vs_balance(values, variants, its)}


def _value_cell(stat: dict, fmt: str) -> str:
    return "–" if not stat["n"] else f"{format_cell(stat, fmt)} ({stat['n']})"


def _diff_cell(stat: dict, fmt: str, claim: bool = True) -> str:
    if not stat["n"]:
        return "–"
    signed = "+" + fmt if stat["mean"] >= 0 else fmt
    spread = f" ± {fmt.format(stat['std'])}" if stat["n"] > 1 else ""
    seeds = f" [{stat['in_paper_direction']}/{stat['n']}]" if claim else ""
    return f"{signed.format(stat['mean'])}{spread}{seeds}"


def _metric_section(metric: Metric, result: dict, names: dict, its: tuple[int, ...]) -> list[str]:
    head = "| | " + " | ".join(f"step {it:,}" for it in its) + " |"
    rule = "|---|" + "---:|" * len(its)
    direction = {1: "paper: PathB4 higher", -1: "paper: PathB4 lower", 0: "no paper claim"}
    lines = [f"### {metric.header} ({direction[metric.claim]})", "", head, rule]
    for key, per_it in result["table"][metric.key].items():
        lines.append(f"| {names[key]} | " + " | ".join(
            _value_cell(per_it[it], metric.fmt) for it in its) + " |")
    for pair, per_it in result["differences"][metric.key].items():
        a, b = pair.split("-")
        lines.append(f"| {names[a]} − {names[b]} | " + " | ".join(
            _diff_cell(per_it[it], metric.fmt, bool(metric.claim)) for it in its) + " |")
    return lines + [""]


def _verdict_lines(result: dict, names: dict) -> list[str]:
    lines = []
    for v in result["verdicts"]:
        metric = METRIC_BY_KEY[v["metric"]]
        d = v["difference"]
        seen = (f"PathB4 − {names[v['baseline']]} = {_diff_cell(d, metric.fmt)} at step "
                f"{v['iteration']:,}" if d["n"] else "no paired seeds yet")
        if v.get("relative"):
            first, last = v["relative"]["first"], v["relative"]["last"]
            seen += (f"; relative gap {_diff_cell(first, '{:.1f}%')} at step "
                     f"{v['first_iteration']:,} → {_diff_cell(last, '{:.1f}%')}")
        lines.append(f"- **{v['direction']}** ({metric.header}): **{v['verdict']}**, "
                     f"{v['trend']} ({seen}).")
        if v["metric"] == "robust_p1" and result.get("recheck"):
            lines.append("  - " + _recheck_line(result["recheck"], names))
    return lines


def _recheck_line(recheck: dict, names: dict) -> str:
    metric = METRIC_BY_KEY["robust_p1_recheck"]
    return (f"re-measured with {DRAWS} permutation draws on {TOKENS:,} tokens, median draw: "
            f"**{recheck['verdict']}** (PathB4 − {names[recheck['baseline']]} = "
            f"{_diff_cell(recheck['difference'], metric.fmt)} at step "
            f"{recheck['iteration']:,}).")


def _recheck_section(cfg: StudyConfig, result: dict, names: dict,
                     its: tuple[int, ...]) -> list[str]:
    """The re-measured robustness, at the checkpoints that have it; [] where none has."""
    table = result["table"]["robust_p1_recheck"]
    measured = tuple(it for it in its if any(table[key][it]["n"] for key in table))
    if not measured:
        return []
    lines = ["## Robustness re-measured", "",
             f"The robustness above is measured with {cfg.robustness_seeds} permutation draws "
             f"on {cfg.robustness_tokens:,} held-out tokens per checkpoint. Re-measured with "
             f"{DRAWS} draws on {TOKENS:,} tokens (`--robustness-recheck`, "
             f"`iter_*/{RECHECK_FILE}`, every draw's perplexity kept) and judged on the median "
             "draw: the mean of the draws' perplexities, the study's definition, is set by the "
             "worst permutation (third table: worst draw / median draw).", ""]
    if result.get("recheck"):
        lines += [_recheck_line(result["recheck"], names), ""]
    for metric in RECHECK_METRICS:
        lines += _metric_section(metric, result, names, measured)
    return lines


def render_markdown(cfg: StudyConfig, variants: list[Variant], seeds: list[int], result: dict,
                    command: str, corpus: dict | None, plots: list[str],
                    drift: dict | None = None) -> str:
    s, its = cfg.shape, cfg.checkpoint_iterations
    names = {v.key: v.paper_name for v in variants}
    done = sum(len(result["finished"][v.key]) for v in variants)
    total = len(variants) * len(seeds)
    missing = [f"{v.key} seed {seed}" for seed in seeds for v in variants
               if seed not in result["finished"][v.key]]
    tokens = cfg.train_iters * cfg.global_batch_size * s.seq_length
    lines = [
        f"Command: `{command}`", "",
        f"**Runs committed: {done} of {total}.** " + (
            "Results are partial until every run is in; missing: " + ", ".join(missing) + "."
            if missing else "Every run is in."), "",
        f"Model: {s.num_layers} layers, d={s.hidden_size}, {s.num_attention_heads} heads / "
        f"{s.num_query_groups} KV heads, {s.num_experts} experts (FFN {s.moe_ffn_hidden_size}) "
        f"top-{s.moe_router_topk}, seq {s.seq_length}; {cfg.train_iters:,} iterations of "
        f"{cfg.global_batch_size} sequences ({tokens:,} tokens), lr {cfg.lr:g} → {cfg.min_lr:g} "
        f"cosine; seeds {', '.join(map(str, seeds))} (a seed fixes the data order of every "
        "variant). Checkpoints evaluated at steps " + ", ".join(f"{it:,}" for it in its) + ".",
        _corpus_line(corpus), _machine_line(result["machines"]),
        f"Evaluation: held-out PPL on {_tokens(cfg.valid_max_tokens)} held-out tokens; LAMBADA: "
        f"first {cfg.lambada_limit} items; path statistics on the first "
        f"{cfg.analysis_tokens:,} held-out tokens, robustness (p=1) on "
        f"{cfg.robustness_tokens:,}.", "",
        "## Verdict per paper direction (PathB4-MoE without LBL)", "",
        f"Rule: *holds* / *reverses* when every paired seed goes one way and the mean paired "
        f"difference is at least {T_THRESHOLD:g} standard errors from zero, else *inside the "
        f"noise*; the gap *grows* / *shrinks* when |mean difference| changes from the first to "
        f"the last checkpoint by more than {T_THRESHOLD:g} standard errors.", "",
        *(_verdict_lines(result, names) or ["- needs PathB4 and both Indep-MoE variants."]), "",
        *balance_section(result, names, its, drift),
        *_recheck_section(cfg, result, names, its),
        "## Every metric at every checkpoint", "",
        "Cells: mean ± sample std over seeds (number of seeds); differences paired by seed, "
        "[seeds in the paper's direction / paired seeds]; – : not yet measured.", "",
    ]
    for metric in TRAJECTORY_METRICS:
        lines += _metric_section(metric, result, names, its)
    speed = result["tokens_per_second"]
    lines += ["Training tokens/s (steady state; a shared 2-core machine at nice 19, so these "
              "reflect the load at the time more than the model): " + "; ".join(
                  f"{names[k]} {_value_cell(v, '{:,.0f}')}" for k, v in speed.items()) + ".", ""]
    if plots:
        lines += ["Plots: " + ", ".join(f"`{p}`" for p in plots), ""]
    return "\n".join(lines)


def _machine_line(machines: dict[str, str]) -> str:
    """When and where the runs finished (machine.txt: '<date>; <machine>')."""
    if not machines:
        return "Machine: no run finished yet."
    dates = sorted(text.split("; ")[0] for text in machines.values())
    where = sorted({text.split("; ", 1)[-1] for text in machines.values()})
    return f"Runs finished {dates[0]} to {dates[-1]} on: {' / '.join(where)}."


def _tokens(limit: int | None) -> str:
    return "all" if limit is None else f"the first {limit:,}"


def _corpus_line(corpus: dict | None) -> str:
    if not corpus:
        return "Data: see the study's --data-path."
    parts = []
    for split in ("train", "valid"):
        by = corpus[split]
        parts.append(f"{split}: " + ", ".join(
            f"{name} {s['documents']:,} files / {s['bytes'] / 1e6:.1f} MB"
            for name, s in by.items()))
    sources = ", ".join(f"{name} ({origin})" for name, origin in corpus["sources"].items())
    return (f"Data: {sources}, split by file; {'; '.join(parts)}; byte-level BPE, vocabulary "
            f"{corpus['vocab_size']:,}, trained on the train split.")


def write_plots(result: dict, variants: list[Variant], its: tuple[int, ...],
                out_dir: str) -> list[str]:
    """trajectory_differences.png (PathB4 − baselines vs steps, every seed and the mean),
    trajectory_values.png (each variant's mean ± std vs steps) and the robustness-vs-balance
    scatter; returns the file names."""
    names = {v.key: v.paper_name for v in variants}
    files = ["trajectory_differences.png", "trajectory_values.png"]
    _grid(lambda ax, m: _difference_panel(ax, result["differences"][m.key], names, its, m),
          os.path.join(out_dir, files[0]), "PathB4 − baseline, paired by seed (thin: seeds)")
    _grid(lambda ax, m: _value_panel(ax, result["table"][m.key], names, its),
          os.path.join(out_dir, files[1]), "Every variant, mean ± std over seeds")
    return files + [write_balance_plot(result, variants, its, out_dir)]


def _grid(draw, path: str, title: str) -> None:
    from megatron_pathmoe.analysis.plots import pyplot, save_figure

    cols = 4
    rows = math.ceil(len(TRAJECTORY_METRICS) / cols)
    fig, axes = pyplot().subplots(rows, cols, figsize=(4 * cols, 3.2 * rows),
                                  layout="constrained")
    for ax, metric in zip(axes.flat, TRAJECTORY_METRICS):
        draw(ax, metric)
        ax.set_title(metric.header, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(TRAJECTORY_METRICS):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8)
    fig.suptitle(title, fontsize=11)
    save_figure(fig, path)


def _difference_panel(ax, diffs: dict, names: dict, its: tuple[int, ...], metric: Metric) -> None:
    ax.axhline(0, color="black", lw=0.8)
    for color, (pair, per_it) in zip(("tab:blue", "tab:orange", "tab:green"), diffs.items()):
        a, b = pair.split("-")
        xs = [it for it in its if per_it[it]["n"]]
        if not xs:
            continue
        seeds = sorted({s for it in xs for s in per_it[it]["by_seed"]})
        for s in seeds:
            pts = [(it, per_it[it]["by_seed"][s]) for it in xs if s in per_it[it]["by_seed"]]
            ax.plot(*zip(*pts), color=color, lw=0.6, alpha=0.5, marker=".")
        mean = [per_it[it]["mean"] for it in xs]
        std = [per_it[it]["std"] for it in xs]
        ax.plot(xs, mean, color=color, lw=2, label=f"{names[a]} − {names[b]}")
        ax.fill_between(xs, [m - s for m, s in zip(mean, std)],
                        [m + s for m, s in zip(mean, std)], color=color, alpha=0.15)
    if metric.claim:
        ax.annotate("paper's way ↑" if metric.claim > 0 else "paper's way ↓",
                    xy=(0.02, 0.9), xycoords="axes fraction", fontsize=7)


def _value_panel(ax, table: dict, names: dict, its: tuple[int, ...]) -> None:
    for key, per_it in table.items():
        xs = [it for it in its if per_it[it]["n"]]
        if not xs:
            continue
        mean = [per_it[it]["mean"] for it in xs]
        std = [per_it[it]["std"] for it in xs]
        ax.errorbar(xs, mean, yerr=std, label=names[key], capsize=3,
                    lw=2 if key.startswith("path") else 1)


def write_report(cfg: StudyConfig, variants: list[Variant], seeds: list[int], command: str,
                 out_dir: str) -> str:
    """results.md, results.json and the plots in ``out_dir`` from the published runs (and
    ``out_dir/corpus.json``, ``out_dir/expert_drift.json`` when present); returns the
    markdown."""
    result = summarize(cfg, variants, seeds)
    corpus = _json(os.path.join(out_dir, "corpus.json"))
    drift = _json(os.path.join(out_dir, DRIFT_FILE))
    result["expert_drift"] = drift_by_variant(drift, variants, cfg.checkpoint_iterations)
    plots = write_plots(result, variants, cfg.checkpoint_iterations, out_dir)
    markdown = render_markdown(cfg, variants, seeds, result, command, corpus, plots, drift)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"command": command, "seeds": seeds,
                   "iterations": list(cfg.checkpoint_iterations),
                   "variants": {v.key: v.paper_name for v in variants}, **result}, f, indent=1)
    return markdown
