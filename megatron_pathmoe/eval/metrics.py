"""From documents and continuation scores to the paper's metrics.

* ``acc``: the choice with the highest ``log p(continuation | context)`` is the gold one.
* ``acc_norm`` (length-normalised accuracy): the highest ``log p / characters``, where
  characters are those of the answer text, i.e. the continuation without its single leading
  separator space. This is lm-evaluation-harness's ``acc_norm`` (``ll / len(choice)``); OLMo's
  ``acc_per_char`` also counts the space. Ties go to the first choice (``argmax``).
* LAMBADA ``acc``: every token of the target word (the continuation) is the model's greedy
  choice; ``perplexity`` = exp(-mean over documents of log p(target)); ``bits_per_byte`` =
  -sum log p / (ln 2 * sum of the continuation's UTF-8 bytes, its leading space included).
* ``*_stderr``: the standard error of the mean over documents, as lm-evaluation-harness gives it.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from megatron_pathmoe.eval.requests import Document
from megatron_pathmoe.eval.scorer import TokenRequest, TokenScore
from megatron_pathmoe.eval.tasks import LAST_WORD


def encode_pair(tokenize, eod: int, context: str, continuation: str,
                cache: dict[str, tuple[int, ...]] | None = None) -> TokenRequest:
    """Token ids of (context, continuation) as lm-evaluation-harness builds them.

    Trailing spaces of the context move to the continuation; the pair is encoded as one string
    and split after the context's own tokens, so merges at the boundary match how the text
    reads as a whole. An empty context becomes the end-of-document token.
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return TokenRequest((eod,), tuple(tokenize(continuation)))
    ids = _encode_cached(tokenize, context, cache)
    whole = tuple(tokenize(context + continuation))
    return TokenRequest(ids, whole[len(ids):])


def _encode_cached(tokenize, text: str, cache: dict[str, tuple[int, ...]] | None):
    if cache is None:
        return tuple(tokenize(text))
    if text not in cache:
        cache[text] = tuple(tokenize(text))
    return cache[text]


def flatten(documents: Sequence[Document]) -> list[tuple[int, int]]:
    """(document index, choice index) of every request, in order."""
    return [(d, c) for d, doc in enumerate(documents) for c in range(len(doc.choices))]


def _mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    stderr = float(arr.std(ddof=1) / math.sqrt(len(arr))) if len(arr) > 1 else float("nan")
    return float(arr.mean()), stderr


def multiple_choice_metrics(documents: Sequence[Document],
                            scores: Sequence[Sequence[TokenScore]]) -> dict[str, float]:
    correct, correct_norm = [], []
    for doc, doc_scores in zip(documents, scores):
        ll = np.array([s.logprob for s in doc_scores])
        chars = np.array([c.answer_chars for c in doc.choices], dtype=np.float64)
        correct.append(float(np.argmax(ll) == doc.gold))
        correct_norm.append(float(np.argmax(ll / chars) == doc.gold))
    acc, acc_se = _mean_stderr(correct)
    acc_norm, acc_norm_se = _mean_stderr(correct_norm)
    return {"acc": acc, "acc_stderr": acc_se, "acc_norm": acc_norm,
            "acc_norm_stderr": acc_norm_se}


def last_word_metrics(documents: Sequence[Document],
                      scores: Sequence[Sequence[TokenScore]]) -> dict[str, float]:
    gold = [doc_scores[doc.gold] for doc, doc_scores in zip(documents, scores)]
    acc, acc_se = _mean_stderr([float(s.greedy) for s in gold])
    logprobs = np.array([s.logprob for s in gold], dtype=np.float64)
    n_bytes = sum(doc.choices[doc.gold].continuation_bytes for doc in documents)
    return {"acc": acc, "acc_stderr": acc_se, "perplexity": float(math.exp(-logprobs.mean())),
            "bits_per_byte": float(-logprobs.sum() / (math.log(2) * n_bytes))}


def task_metrics(kind: str, documents: Sequence[Document],
                 scores: Sequence[Sequence[TokenScore]]) -> dict[str, float]:
    metrics = (last_word_metrics if kind == LAST_WORD else multiple_choice_metrics)(
        documents, scores)
    flat = [s for doc_scores in scores for s in doc_scores]
    metrics.update(num_docs=len(documents), num_requests=len(flat),
                   context_truncated=sum(s.context_truncated for s in flat),
                   beyond_max_length=sum(s.beyond_max_length for s in flat))
    return metrics
