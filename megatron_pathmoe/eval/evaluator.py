"""Evaluate a model on tasks and on a token dataset, given a scorer and a text encoder."""

from __future__ import annotations

import math
from typing import Protocol, Sequence

import numpy as np

from megatron_pathmoe.eval.metrics import encode_pair, flatten, task_metrics
from megatron_pathmoe.eval.scorer import LoglikelihoodScorer, TokenRequest
from megatron_pathmoe.eval.tasks import TaskRequests


class Tokenizer(Protocol):
    """What scoring needs from a tokenizer (``PathMoETokenizer`` has it; tests use stubs)."""

    eod: int
    vocab_size: int

    def tokenize(self, text: str) -> list[int]: ...


def evaluate_task(scorer: LoglikelihoodScorer, tokenizer: Tokenizer, task: TaskRequests,
                  samples: list[dict] | None = None) -> dict:
    """Score every choice of every document; the task's metrics plus where they came from.
    With ``samples``, one record per request (document, choice, score) is appended to it."""
    cache: dict[str, tuple[int, ...]] = {}
    index = flatten(task.documents)
    choices = [task.documents[d].choices[c] for d, c in index]
    requests = [encode_pair(tokenizer.tokenize, tokenizer.eod, ch.context, ch.continuation, cache)
                for ch in choices]
    flat_scores = scorer.score(requests, desc=task.spec.name)
    per_doc: list[list] = [[] for _ in task.documents]
    for (d, c), score in zip(index, flat_scores):
        per_doc[d].append(score)
        if samples is not None:
            doc = task.documents[d]
            samples.append({"task": task.spec.name, "doc_id": doc.doc_id, "choice": c,
                            "gold": doc.gold, "logprob": score.logprob, "greedy": score.greedy,
                            "num_tokens": score.num_tokens,
                            "answer_chars": doc.choices[c].answer_chars})
    return {"task": task.spec.name, "title": task.spec.title, "split": task.split,
            "num_fewshot": task.num_fewshot, "source": task.path,
            **task_metrics(task.spec.kind, task.documents, per_doc)}


def perplexity_windows(tokens: np.ndarray, seq_length: int) -> list[TokenRequest]:
    """Non-overlapping windows of ``seq_length`` predicted tokens: every token but the first
    is predicted exactly once, from up to ``seq_length`` preceding tokens of its window."""
    tokens = [int(t) for t in tokens]
    return [TokenRequest((tokens[start],), tuple(tokens[start + 1:start + seq_length + 1]))
            for start in range(0, len(tokens) - 1, seq_length)]


def evaluate_perplexity(scorer: LoglikelihoodScorer, prefixes: Sequence[str], seq_length: int,
                        max_tokens: int | None = None) -> dict:
    """Per-token loss and perplexity over the documents of .bin/.idx datasets (in order)."""
    from megatron_pathmoe.data import token_stream

    tokens = np.concatenate([token_stream(p) for p in prefixes])
    if max_tokens is not None:
        tokens = tokens[:max_tokens + 1]
    if len(tokens) < 2:
        raise ValueError(f"validation data {list(prefixes)} holds fewer than 2 tokens")
    scores = scorer.score(perplexity_windows(tokens, seq_length), desc="validation ppl")
    n = sum(s.num_tokens for s in scores)
    loss = -sum(s.logprob for s in scores) / n
    return {"data": list(prefixes), "tokens": n, "loss": loss, "perplexity": math.exp(loss),
            "bits_per_token": loss / math.log(2)}

