"""Downstream evaluation: the paper's tasks (offline request files) and validation perplexity.

``tools/evaluate.py`` / ``pathmoe-evaluate`` is the command line (:mod:`.cli`); the scorer
takes any model and tokenizer, so tests drive it with controlled logits. Above ``checkpoint/``
and ``runtime/`` (models come from ``checkpoint.load_model_for_inference``), never
``training/``.
"""

from megatron_pathmoe.eval.evaluator import evaluate_perplexity, evaluate_task
from megatron_pathmoe.eval.logprobs import VocabLayout, target_logprobs
from megatron_pathmoe.eval.metrics import encode_pair, task_metrics
from megatron_pathmoe.eval.requests import Choice, Document, TaskError, read_documents
from megatron_pathmoe.eval.scorer import LoglikelihoodScorer, TokenRequest, TokenScore
from megatron_pathmoe.eval.tasks import PAPER_TASKS, TASKS, TaskRequests, load_task

__all__ = [
    "Choice",
    "Document",
    "LoglikelihoodScorer",
    "PAPER_TASKS",
    "TASKS",
    "TaskError",
    "TaskRequests",
    "TokenRequest",
    "TokenScore",
    "VocabLayout",
    "encode_pair",
    "evaluate_perplexity",
    "evaluate_task",
    "load_task",
    "read_documents",
    "target_logprobs",
    "task_metrics",
]
