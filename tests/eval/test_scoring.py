"""Scoring and metrics against a bigram model whose log-likelihoods are known in closed form."""

from __future__ import annotations

import math
import random

import pytest
import torch

from megatron_pathmoe.eval import LoglikelihoodScorer, TokenRequest, VocabLayout, load_task
from megatron_pathmoe.eval.evaluator import evaluate_task
from megatron_pathmoe.eval.logprobs import target_logprobs
from megatron_pathmoe.eval.metrics import encode_pair
from megatron_pathmoe.eval.scorer import plan_rows
from megatron_pathmoe.eval.tasks import LAST_WORD
from tests.eval.stubs import (
    VOCAB,
    BigramLM,
    CharTokenizer,
    expected_logprob,
    prefer,
    uniform_table,
    write_requests,
)


def _scorer(table: torch.Tensor, **kwargs) -> LoglikelihoodScorer:
    kwargs = {"max_length": 64, "progress": False, **kwargs}
    return LoglikelihoodScorer(BigramLM(table), VocabLayout(VOCAB), **kwargs)


def _evaluate(table, path, **kwargs):
    samples: list[dict] = []
    result = evaluate_task(_scorer(table, **kwargs), CharTokenizer(), load_task(path), samples)
    return result, samples


def test_handmade_multiple_choice_task_gives_known_accuracy(tmp_path):
    table = uniform_table()
    prefer(table, " ", "a", 6.0)  # the model always answers " a"
    docs = [([("Q1:", " a"), ("Q1:", " b"), ("Q1:", " c")], 0),  # right
            ([("Q2:", " a"), ("Q2:", " b")], 1),  # wrong: gold is " b"
            ([("Q3:", " b"), ("Q3:", " c"), ("Q3:", " a")], 2)]  # right
    result, samples = _evaluate(table, write_requests(tmp_path / "mc.jsonl.gz", docs))
    assert result["acc"] == pytest.approx(2 / 3)
    assert result["num_docs"] == 3 and result["num_requests"] == 8
    for sample in samples:
        context, continuation = docs[sample["doc_id"]][0][sample["choice"]]
        assert sample["logprob"] == pytest.approx(expected_logprob(table, context, continuation),
                                                  abs=1e-5)


def test_length_normalisation_flips_the_answer(tmp_path):
    table = uniform_table()
    prefer(table, " ", "x", 4.0)
    prefer(table, " ", "y", 3.0)
    prefer(table, "y", "y", 9.0)
    short, long = (" x", " yyyy")
    # Premise: the short answer has the higher total, the long one the higher per character.
    ll_short, ll_long = (expected_logprob(table, "Q:", c) for c in (short, long))
    assert ll_short > ll_long and ll_short / 1 < ll_long / 4
    path = write_requests(tmp_path / "norm.jsonl", [([("Q:", short), ("Q:", long)], 1)])
    result, _ = _evaluate(table, path)
    assert (result["acc"], result["acc_norm"]) == (0.0, 1.0)


def test_lambada_style_exact_match_perplexity_and_bits_per_byte(tmp_path):
    table = uniform_table()
    for after, nxt in (("e", " "), (" ", "m"), ("m", "a"), ("a", "t")):
        prefer(table, after, nxt, 5.0)
    context = "the cat sat on the"
    path = write_requests(tmp_path / "lambada.jsonl",
                          [([(context, " mat")], ["mat"]), ([(context, " hat")], ["hat"])])
    task = load_task(path)
    assert task.spec.kind == LAST_WORD
    result, _ = _evaluate(table, path)
    ll = [expected_logprob(table, context, word) for word in (" mat", " hat")]
    assert result["acc"] == 0.5  # " mat" is every token's argmax, " hat" is not
    assert result["perplexity"] == pytest.approx(math.exp(-sum(ll) / 2), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(-sum(ll) / (math.log(2) * 8), rel=1e-5)


def _random_requests(rng: random.Random, n: int) -> list[TokenRequest]:
    text = lambda k: tuple(rng.randrange(1, VOCAB) for _ in range(k))  # noqa: E731
    requests = [TokenRequest(text(rng.randint(1, 20)), text(rng.randint(1, 10)))
                for _ in range(n)]
    shared = text(7)  # single-token choices and a two-token one: one row serves them all
    return requests + [TokenRequest(shared, (c,)) for c in (5, 6, 7)] + \
        [TokenRequest(shared, (8, 9))]


def test_batching_and_shared_rows_do_not_change_scores():
    torch.manual_seed(0)
    table = torch.randn(VOCAB, VOCAB) * 3
    requests = _random_requests(random.Random(0), 40)
    rows, placements = plan_rows(requests, max_length=64)
    assert len({p.row for p in placements[-4:]}) == 1
    for request, p in zip(requests, placements):  # every request reads its own tokens
        row = rows[p.row]
        assert row[:p.first + 1] == request.context
        assert row[p.first + 1:p.first + len(request.continuation)] == request.continuation[:-1]
    results = {}
    for budget in (1, 37, 4096):
        scorer = _scorer(table, max_batch_tokens=budget)
        results[budget] = scorer.score(requests)
        if budget == 1:
            assert scorer.forwards == len(rows) <= len(requests) - 3
    for request, *scores in zip(requests, *results.values()):
        expected = expected_logprob(table, "".join(map(chr, request.context)),
                                    "".join(map(chr, request.continuation)))
        for score in scores:
            assert score.logprob == pytest.approx(expected, abs=1e-4)
            assert score == scores[0]


def test_padded_vocabulary_columns_are_ignored():
    table = uniform_table(columns=VOCAB + 32)
    table[:, VOCAB:] = 50.0  # megatron's padding rows: never a real token
    prefer(table, "a", "b", 2.0)
    [score] = _scorer(table).score([TokenRequest((ord("a"),), (ord("b"),))])
    assert score.greedy
    assert score.logprob == pytest.approx(expected_logprob(table, "a", "b"), abs=1e-6)


def test_long_requests_lose_context_and_long_continuations_are_flagged():
    torch.manual_seed(1)
    table = torch.randn(VOCAB, VOCAB)
    requests = [TokenRequest(tuple(b"abcdefgh"), tuple(b"ij")),
                TokenRequest(tuple(b"abcdefgh"), tuple(b"0123456789"))]
    cut, beyond = _scorer(table, max_length=4).score(requests)
    assert cut.context_truncated and not cut.beyond_max_length
    assert beyond.beyond_max_length and beyond.num_tokens == 10
    # A bigram model needs only the previous character: both still score exactly.
    assert cut.logprob == pytest.approx(expected_logprob(table, "h", "ij"), abs=1e-5)
    assert beyond.logprob == pytest.approx(expected_logprob(table, "h", "0123456789"), abs=1e-5)


def test_encode_pair_moves_trailing_spaces_and_replaces_an_empty_context():
    tok = CharTokenizer()
    request = encode_pair(tok.tokenize, tok.eod, "Answer: ", "yes")
    assert request == TokenRequest(tuple(b"Answer:"), tuple(b" yes"))
    assert encode_pair(tok.tokenize, tok.eod, "", "yes").context == (tok.eod,)


def test_targets_outside_the_vocabulary_are_rejected():
    with pytest.raises(ValueError, match="disagree on the vocabulary"):
        target_logprobs(torch.zeros(1, VOCAB), torch.tensor([VOCAB]), VocabLayout(VOCAB))


def test_validation_perplexity_predicts_every_token_once(tmp_path):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megatron_pathmoe.eval import evaluate_perplexity

    rng = np.random.default_rng(0)
    docs = [rng.integers(1, VOCAB, size=n).astype(np.uint16) for n in (50, 7, 31)]
    prefix = str(tmp_path / "valid_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_document(doc, [doc.size])
    builder.finalize(prefix + ".idx")
    torch.manual_seed(2)
    table = torch.randn(VOCAB, VOCAB)
    stream = "".join(chr(t) for t in np.concatenate(docs))
    result = evaluate_perplexity(_scorer(table), [prefix], seq_length=16)
    assert result["tokens"] == len(stream) - 1
    expected = -expected_logprob(table, stream[0], stream[1:]) / (len(stream) - 1)
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
