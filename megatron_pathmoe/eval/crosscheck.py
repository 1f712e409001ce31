"""Cross-check ``pathmoe-evaluate`` against lm-evaluation-harness on the same requests.

The checkpoint is exported to a Hugging Face Qwen2-MoE directory (``megatron_pathmoe.convert``),
lm-evaluation-harness (``lm_eval``, model type ``hf``) scores local task definitions written
from the very documents ``pathmoe-evaluate`` scores (same request files, same ``--limit``), and
both per-request log-likelihoods and accuracies are compared:

    python -m megatron_pathmoe.eval.crosscheck --load CKPT --tasks arc_easy,lambada --limit 50

Tolerance: per-request log-likelihoods agree within ``--atol`` nats (float32 rounding between
two implementations of the same network; the export reproduces the logits), and accuracies are
equal except on documents whose two best choices are closer than that tolerance, where
rounding may legitimately pick either (reported; zero on the tiny models tried).
Multiple-choice tasks need one context shared by all choices (WinoGrande's partial
evaluation is left out) and continuations that start with the space lm-eval inserts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Sequence

from megatron_pathmoe.eval.requests import Document, TaskError
from megatron_pathmoe.eval.tasks import LAST_WORD, TaskRequests, expand_task_names, load_task

TASK_PREFIX = "pathmoe_xcheck_"


def _mc_doc(doc: Document, task: str) -> dict:
    contexts = {c.context for c in doc.choices}
    if len(contexts) != 1 or not all(c.continuation.startswith(" ") for c in doc.choices):
        raise TaskError(f"{task}: doc {doc.doc_id} has per-choice contexts or continuations "
                        "without a leading space; lm-eval's multiple_choice cannot express it")
    return {"doc_id": doc.doc_id, "context": contexts.pop(), "gold": doc.gold,
            "choices": [c.continuation[1:] for c in doc.choices]}


def _task_yaml(name: str, data_file: str, last_word: bool) -> str:
    common = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
              f"    test: {json.dumps(data_file)}\ntest_split: test\ndoc_to_text: context\n")
    if last_word:  # LAMBADA: acc = greedy match, perplexity over the target
        return common + ("output_type: loglikelihood\ndoc_to_target: continuation\n"
                         "target_delimiter: ''\nmetric_list:\n"
                         "  - {metric: perplexity, aggregation: perplexity, "
                         "higher_is_better: false}\n"
                         "  - {metric: acc, aggregation: mean, higher_is_better: true}\n")
    return common + ("output_type: multiple_choice\ndoc_to_choice: choices\ndoc_to_target: gold\n"
                     "target_delimiter: ' '\nmetric_list:\n"
                     "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
                     "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n")


def write_lm_eval_task(task: TaskRequests, out_dir: str) -> str:
    """A local lm-eval task (yaml + jsonl) holding ``task``'s documents; returns its name."""
    name = TASK_PREFIX + task.spec.name
    last_word = task.spec.kind == LAST_WORD
    data_file = os.path.join(out_dir, f"{name}.jsonl")
    with open(data_file, "w") as f:
        for doc in task.documents:
            record = ({"doc_id": doc.doc_id, "context": doc.choices[0].context,
                       "continuation": doc.choices[0].continuation} if last_word
                      else _mc_doc(doc, task.spec.name))
            f.write(json.dumps(record) + "\n")
    with open(os.path.join(out_dir, f"{name}.yaml"), "w") as f:
        f.write(_task_yaml(name, data_file, last_word))
    return name


def run_lm_eval(hf_dir: str, task_dir: str, names: Sequence[str], max_length: int) -> dict:
    """lm-eval's results and per-document samples for the local tasks, float32 on the CPU."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},dtype=float32,max_length={max_length}",
        tasks=list(names), task_manager=TaskManager(include_path=task_dir,
                                                    include_defaults=False),
        batch_size=16, device="cpu", log_samples=True, bootstrap_iters=0)


def _lm_eval_scores(samples: list[dict]) -> dict[tuple[int, int], tuple[float, bool]]:
    """(doc_id, choice) -> (log-likelihood, greedy) from lm-eval's logged samples."""
    return {(sample["doc"]["doc_id"], choice): (float(resp[0][0]), bool(resp[0][1]))
            for sample in samples for choice, resp in enumerate(sample["resps"])}


def _near_ties(ours: list[dict], atol: float, per_char: bool) -> int:
    """Documents whose best two choices differ by less than atol (after normalisation)."""
    by_doc: dict[int, list[float]] = {}
    for s in ours:
        score = s["logprob"] / s["answer_chars"] if per_char else s["logprob"]
        by_doc.setdefault(s["doc_id"], []).append(score)
    return sum(1 for scores in by_doc.values()
               if len(scores) > 1 and sorted(scores)[-1] - sorted(scores)[-2] < atol)


def compare(ours_report: dict, ours_samples: list[dict], lm_results: dict,
            atol: float) -> list[dict]:
    """Per task: both accuracies, the largest log-likelihood gap, greedy disagreements, near
    ties, and whether the two agree within tolerance."""
    rows = []
    for task, result in ours_report["tasks"].items():
        name = TASK_PREFIX + task
        theirs = _lm_eval_scores(lm_results["samples"][name])
        mine = [s for s in ours_samples if s["task"] == task]
        n = result["num_docs"]
        row = {"task": task, "docs": n, "requests": len(mine),
               "max_abs_logprob_diff": max(abs(s["logprob"] - theirs[(s["doc_id"], s["choice"])][0])
                                           for s in mine),
               "greedy_disagreements": sum(s["greedy"] != theirs[(s["doc_id"], s["choice"])][1]
                                           for s in mine)}
        agree = row["max_abs_logprob_diff"] <= atol and row["greedy_disagreements"] == 0
        for metric in ("acc", "acc_norm", "perplexity"):
            lm_value = lm_results["results"][name].get(f"{metric},none")
            if metric in result and lm_value is not None:
                row[metric], row[f"lm_eval_{metric}"] = result[metric], lm_value
        for metric, per_char in (("acc", False), ("acc_norm", True)):
            if metric in row:  # a flip is allowed only on a near tie
                ties = _near_ties(mine, atol, per_char)
                row[f"{metric}_near_ties"] = ties
                agree &= abs(row[metric] - row[f"lm_eval_{metric}"]) * n <= ties + 1e-9
        if "perplexity" in row:
            agree &= abs(row["perplexity"] / row["lm_eval_perplexity"] - 1) <= atol
        row["ok"] = bool(agree)
        rows.append(row)
    return rows


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_pathmoe.eval.crosscheck", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--load", required=True, help="megatron-pathmoe checkpoint")
    parser.add_argument("--tasks", default="arc_easy,lambada",
                        help="tasks with a shared context per document (not winogrande)")
    parser.add_argument("--limit", type=int, default=50, help="documents per task")
    parser.add_argument("--atol", type=float, default=1e-3,
                        help="largest allowed per-request log-likelihood difference (nats)")
    parser.add_argument("--work-dir", default=None,
                        help="keep the HF export, lm-eval tasks and outputs here (None: a "
                             "temporary directory)")
    parser.add_argument("--output-json", default=None, help="write the comparison here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from megatron_pathmoe.convert.checkpoint import export_to_hf
    from megatron_pathmoe.eval import cli
    from megatron_pathmoe.checkpoint import read_run_config

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or tmp
        os.makedirs(work, exist_ok=True)
        names = expand_task_names(args.tasks)
        lm_names = [write_lm_eval_task(load_task(n, limit=args.limit), work) for n in names]
        hf_dir = export_to_hf(args.load, os.path.join(work, "hf"), overwrite=True)
        report_path, samples_path = (os.path.join(work, f) for f in ("ours.json", "ours.jsonl"))
        code = cli.main(["--load", args.load, "--tasks", ",".join(names), "--limit",
                         str(args.limit), "--output-json", report_path, "--log-samples",
                         samples_path, "--no-progress"])
        if code:
            return code
        lm_results = run_lm_eval(hf_dir, work, lm_names,
                                 read_run_config(args.load).model.seq_length)
        rows = compare(json.load(open(report_path)),
                       [json.loads(line) for line in open(samples_path)], lm_results, args.atol)
    for row in rows:
        print(json.dumps(row))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
