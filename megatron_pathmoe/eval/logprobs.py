"""Log-probabilities and greedy flags of target tokens from (vocab-parallel) logits.

With tensor parallelism megatron's output layer leaves the logits split over the vocabulary
(``parallel_output=True``): rank r holds columns ``[r*V/tp, (r+1)*V/tp)`` of the padded
vocabulary. Rather than gathering ``[tokens, V]`` on every rank (tp times the memory and an
all-gather of all logits), the log-softmax is computed where the logits live with megatron's
``vocab_parallel_cross_entropy`` (all-reduces of ``[tokens]``-sized tensors only), and the
greedy check compares the target's logit with the all-reduced maximum.

Columns past the tokenizer's vocabulary (megatron pads the embedding to a multiple of
128 * tp) are excluded from the softmax and the argmax: the tokenizer can never produce them,
and a Hugging Face export drops them, so scores agree with the exported model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class VocabLayout:
    """Which vocabulary columns this rank's logits hold."""

    vocab_size: int  # the tokenizer's (real) vocabulary
    start: int = 0  # vocabulary id of this rank's first logit column
    group: dist.ProcessGroup | None = None  # tensor-parallel group when logits are split

    @property
    def split(self) -> bool:
        return self.group is not None and dist.get_world_size(self.group) > 1

    @classmethod
    def from_megatron(cls, vocab_size: int, local_columns: int) -> "VocabLayout":
        """The layout of a megatron GPTModel's output under the current parallel state."""
        from megatron.core import parallel_state as ps

        rank = ps.get_tensor_model_parallel_rank()
        return cls(vocab_size, start=rank * local_columns,
                   group=ps.get_tensor_model_parallel_group())


def _mask_padding(logits: torch.Tensor, vocab: VocabLayout) -> torch.Tensor:
    ids = torch.arange(vocab.start, vocab.start + logits.shape[-1], device=logits.device)
    return logits.float().masked_fill(ids >= vocab.vocab_size, float("-inf"))


def _local_target_logit(logits: torch.Tensor, targets: torch.Tensor,
                        vocab: VocabLayout) -> torch.Tensor:
    local = targets - vocab.start
    inside = (local >= 0) & (local < logits.shape[-1])
    picked = logits.gather(-1, local.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return torch.where(inside, picked, torch.zeros_like(picked))


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor,
                    vocab: VocabLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(target)`` (float32) and whether the target is the argmax, per row.

    Args:
        logits: ``[n, V_local]`` this rank's logit columns for n positions.
        targets: ``[n]`` vocabulary ids.
        vocab: the column layout (``group`` set when the columns are split over ranks).
    Ties with the maximum count as greedy.
    """
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab.vocab_size):
        raise ValueError(f"target ids must lie in [0, {vocab.vocab_size}): the tokenizer and "
                         "the model disagree on the vocabulary")
    logits = _mask_padding(logits, vocab)
    if not vocab.split:
        target = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return target - torch.logsumexp(logits, dim=-1), target >= logits.max(dim=-1).values
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    target = _local_target_logit(logits, targets, vocab)
    maximum = logits.max(dim=-1).values
    dist.all_reduce(target, group=vocab.group)  # exactly one rank holds a non-zero value
    dist.all_reduce(maximum, op=dist.ReduceOp.MAX, group=vocab.group)
    # Overwrites ``logits`` (our masked copy) in place; nothing reads it afterwards.
    logprob = -vocab_parallel_cross_entropy(logits, targets)
    return logprob, target >= maximum
