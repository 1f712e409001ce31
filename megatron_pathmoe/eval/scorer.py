"""Batched continuation log-likelihoods: ``log p(continuation | context)`` for many requests.

How the work is laid out:

* a request becomes one input row ``(context + continuation)[:-1]`` whose last
  ``len(continuation)`` positions predict the continuation; only those positions are scored;
* requests whose input rows are equal, or one a prefix of the other, share the longer row: a
  context followed by single-token choices (BoolQ's " yes"/" no", MMLU's letters) costs one
  row instead of one per choice;
* rows are sorted longest first and packed into forwards of at most ``max_batch_tokens``
  padded tokens, right-padded (causal attention: padding never affects real positions, and
  the MoE layers drop no tokens, so a row scores the same in any batch);
* with data parallelism each rank takes one batch per round and every rank of a round pads to
  the same shape, so expert-parallel all-to-alls/all-gathers always line up; results are then
  gathered to all ranks.

A row longer than ``max_length`` (the trained sequence length by default) loses context
tokens from the left, as lm-evaluation-harness does; a continuation that alone exceeds it is
scored whole in a longer window (RoPE extrapolates) and flagged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_pathmoe.eval.logprobs import VocabLayout, target_logprobs


@dataclass(frozen=True)
class TokenRequest:
    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass(frozen=True)
class TokenScore:
    logprob: float  # sum over the continuation's tokens (natural log)
    greedy: bool  # every continuation token is the argmax given its prefix
    num_tokens: int
    context_truncated: bool = False
    beyond_max_length: bool = False


@dataclass(frozen=True)
class _Placement:
    row: int
    first: int  # position whose logits predict continuation[0]
    targets: tuple[int, ...]
    context_truncated: bool
    beyond_max_length: bool


def _place(request: TokenRequest, max_length: int) -> tuple[tuple[int, ...], int, bool, bool]:
    if not request.context or not request.continuation:
        raise ValueError("a request needs at least one context and one continuation token")
    full = request.context + request.continuation
    window = max(max_length, len(request.continuation))
    truncated = len(full) - 1 > window
    row = full[-(window + 1):][:-1] if truncated else full[:-1]
    return row, len(row) - len(request.continuation), truncated, window > max_length


def plan_rows(requests: Sequence[TokenRequest],
              max_length: int) -> tuple[list[tuple[int, ...]], list[_Placement]]:
    """Input rows to run and, per request, where in which row its continuation is scored.

    A row that is a prefix of another row is not run: causal attention gives its positions
    the same logits inside the longer one (e.g. BoolQ's " no" row is the " yes" row minus one
    token when " yes" takes two tokens).
    """
    placed = [_place(request, max_length) for request in requests]
    unique = sorted({row for row, *_ in placed})
    # Sorted lexicographically, a row's extensions follow it directly: cover by the next.
    cover = list(range(len(unique)))
    for i in range(len(unique) - 2, -1, -1):
        if unique[i + 1][:len(unique[i])] == unique[i]:
            cover[i] = cover[i + 1]
    kept = sorted(set(cover))
    index = {k: n for n, k in enumerate(kept)}
    slot = {row: index[cover[i]] for i, row in enumerate(unique)}
    placements = [_Placement(slot[row], first, request.continuation, truncated, beyond)
                  for request, (row, first, truncated, beyond) in zip(requests, placed)]
    return [unique[k] for k in kept], placements


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_batches(lengths: Sequence[int], max_batch_tokens: int,
                 multiple: int = 1) -> list[list[int]]:
    """Row ids, longest first, packed so that rows x padded length <= max_batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches:
            width = _round_up(lengths[batches[-1][0]], multiple)
            if (len(batches[-1]) + 1) * width <= max_batch_tokens:
                batches[-1].append(i)
                continue
        batches.append([i])
    return batches


class LoglikelihoodScorer:
    """Scores :class:`TokenRequest` lists with any causal LM.

    Args:
        model: ``model(tokens [b, s], position_ids [b, s], attention_mask=None)`` returning
            logits ``[b, s, V_local]`` (megatron's GPTModel, or a stub in tests).
        vocab: which vocabulary columns the logits hold on this rank.
        max_length: longest input row before context is cut (the trained sequence length).
        max_batch_tokens: padded tokens per forward.
        pad_id: token used for right padding (never scored).
        seq_multiple: pad row length to a multiple of this (TP size under sequence parallel).
        dp_group: data-parallel group to spread batches over (None: this process does all).
        device: where input tensors go.
        progress: show a tqdm bar (pass False on all but one rank).
    """

    def __init__(self, model: Callable[..., torch.Tensor], vocab: VocabLayout, *,
                 max_length: int, max_batch_tokens: int = 4096, pad_id: int = 0,
                 seq_multiple: int = 1, dp_group: Any = None, device: str | torch.device = "cpu",
                 progress: bool = True) -> None:
        if max_length < 1 or max_batch_tokens < 1:
            raise ValueError("max_length and max_batch_tokens must be positive")
        self.model, self.vocab = model, vocab
        self.max_length, self.max_batch_tokens = max_length, max_batch_tokens
        self.pad_id, self.seq_multiple = pad_id, seq_multiple
        self.dp_group, self.device, self.progress = dp_group, torch.device(device), progress
        self.forwards = 0  # forwards run by this rank (dummy ones included)

    def _dp(self) -> tuple[int, int]:
        if self.dp_group is None or not dist.is_initialized():
            return 0, 1
        return dist.get_rank(self.dp_group), dist.get_world_size(self.dp_group)

    @torch.no_grad()
    def score(self, requests: Sequence[TokenRequest], desc: str = "") -> list[TokenScore]:
        rows, placements = plan_rows(requests, self.max_length)
        by_row: dict[int, list[int]] = {}
        for i, placement in enumerate(placements):
            by_row.setdefault(placement.row, []).append(i)
        batches = plan_batches([len(r) for r in rows], self.max_batch_tokens, self.seq_multiple)
        dp_rank, dp_size = self._dp()
        mine: dict[int, TokenScore] = {}
        rounds = range(0, len(batches), dp_size)
        for start in tqdm(rounds, desc=desc, unit="batch", disable=not self.progress,
                          dynamic_ncols=True):
            group = batches[start:start + dp_size]
            shape = (max(len(b) for b in group),
                     _round_up(max(len(rows[b[0]]) for b in group), self.seq_multiple))
            batch = group[dp_rank] if dp_rank < len(group) else []
            mine.update(self._score_batch(batch, rows, placements, by_row, shape))
        return self._gather(mine, len(requests))

    def _score_batch(self, batch: list[int], rows, placements, by_row,
                     shape: tuple[int, int]) -> dict[int, TokenScore]:
        tokens = torch.full(shape, self.pad_id, dtype=torch.long)
        flat, targets, owners = [], [], []
        for b, row_id in enumerate(batch):
            row = rows[row_id]
            tokens[b, :len(row)] = torch.tensor(row, dtype=torch.long)
            for i in by_row[row_id]:
                p = placements[i]
                flat.extend(b * shape[1] + p.first + k for k in range(len(p.targets)))
                targets.extend(p.targets)
                owners.append(i)
        position_ids = torch.arange(shape[1], dtype=torch.long).expand(shape)
        logits = self.model(tokens.to(self.device), position_ids.to(self.device), None)
        self.forwards += 1
        if not owners:  # a padding round on this data-parallel rank
            return {}
        selected = logits.reshape(shape[0] * shape[1], -1)[torch.tensor(flat, device=logits.device)]
        logprob, greedy = target_logprobs(selected, torch.tensor(targets, device=logits.device),
                                          self.vocab)
        logprob, greedy = logprob.double().cpu(), greedy.cpu()
        scores, offset = {}, 0
        for i in owners:
            p = placements[i]
            n = len(p.targets)
            scores[i] = TokenScore(float(logprob[offset:offset + n].sum()),
                                   bool(greedy[offset:offset + n].all()), n,
                                   p.context_truncated, p.beyond_max_length)
            offset += n
        return scores

    def _gather(self, mine: dict[int, TokenScore], n: int) -> list[TokenScore]:
        _, dp_size = self._dp()
        if dp_size > 1:
            parts: list[dict[int, TokenScore]] = [{} for _ in range(dp_size)]
            dist.all_gather_object(parts, mine, group=self.dp_group)
            mine = {k: v for part in parts for k, v in part.items()}
        missing = n - len(mine)
        if missing:
            raise RuntimeError(f"{missing} of {n} requests were not scored (a rank's batches "
                               "went missing)")
        return [mine[i] for i in range(n)]
