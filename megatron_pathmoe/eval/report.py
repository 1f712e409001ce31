"""Results as JSON and as markdown tables in the column order of the paper's Table 1."""

from __future__ import annotations

import json
from typing import Sequence

from megatron_pathmoe.eval.tasks import PAPER_TASKS, TASKS, custom_task_spec

DASH = "–"


def _spec(result: dict):
    return TASKS.get(result["task"]) or custom_task_spec(result["source"])


def table_value(result: dict) -> float:
    """The number the paper's table shows for this task, in percent."""
    return 100.0 * result[_spec(result).table_metric]


def paper_average(results: Sequence[dict]) -> tuple[float | None, int]:
    """Mean of the Table-1 columns that were evaluated, and how many there were."""
    values = [table_value(r) for r in results if r["task"] in PAPER_TASKS]
    return (sum(values) / len(values) if values else None), len(values)


def build_report(meta: dict, results: Sequence[dict], validation: dict | None) -> dict:
    average, count = paper_average(results)
    return {**meta, "tasks": {r["task"]: r for r in results},
            "table": {_spec(r).column: round(table_value(r), 2) for r in results},
            "average": None if average is None else round(average, 2),
            "average_over_tasks": count, "validation": validation}


def _fmt(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(label: str, columns: list[str], values: dict[str, float | None]) -> list[str]:
    return [_row(["Model", *columns]), _row(["---"] * (len(columns) + 1)),
            _row([label, *(_fmt(values.get(c)) for c in columns)])]


def _details(results: Sequence[dict]) -> list[str]:
    lines = [_row(["Task", "Split", "Shots", "Docs", "acc", "acc_norm", "Other"]),
             _row(["---"] * 7)]
    for r in results:
        other = ""
        if "perplexity" in r:
            other = f"ppl {r['perplexity']:.2f}, bits/byte {r['bits_per_byte']:.3f}"
        if r["context_truncated"] or r["beyond_max_length"]:
            other += (f"{'; ' if other else ''}{r['context_truncated']} context-truncated, "
                      f"{r['beyond_max_length']} beyond max length")
        acc_norm = _fmt(100 * r["acc_norm"]) if "acc_norm" in r else DASH
        shots = DASH if r["num_fewshot"] is None else str(r["num_fewshot"])
        lines.append(_row([_spec(r).title, r["split"], shots,
                           str(r["num_docs"]), _fmt(100 * r["acc"]), acc_norm, other]))
    return lines


def render_markdown(report: dict) -> str:
    """Table-1 row (accuracy %, length-normalised where the paper uses it), then other tasks,
    per-task details and validation perplexity."""
    results = list(report["tasks"].values())
    label = report.get("label", "model")
    table = dict(report["table"])
    paper_columns = [TASKS[name].column for name in PAPER_TASKS]
    table["Avg."] = report["average"]
    lines: list[str] = []
    if report["average_over_tasks"]:
        lines += _table(label, paper_columns + ["Avg."], table)
        if report["average_over_tasks"] != len(PAPER_TASKS):
            lines.append(f"\nAvg. is over the {report['average_over_tasks']} Table-1 tasks "
                         "evaluated.")
        lines.append("")
    extra = [_spec(r).column for r in results if r["task"] not in PAPER_TASKS]
    if extra:
        lines += [*_table(label, extra, table), ""]
    lines += _details(results)
    valid = report.get("validation")
    if valid:
        lines += ["", f"Validation: {valid['tokens']:,} tokens, loss {valid['loss']:.4f}, "
                      f"perplexity {valid['perplexity']:.2f}"]
    return "\n".join(lines) + "\n"


def write_outputs(report: dict, json_path: str | None, markdown_path: str | None) -> str:
    markdown = render_markdown(report)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(markdown)
    return markdown
