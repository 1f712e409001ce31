"""How batches go through the GPTModel: megatron's ``forward_step_func``, the loss it
reports and one call of megatron's forward-backward schedule, shared by training, validation
and the analysis's evaluation forwards."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterator

import torch


def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module,
                 ) -> tuple[torch.Tensor, Callable]:
    """Megatron's forward_step_func: returns the per-token losses and how to reduce them.
    The batch fetch runs in the "batch-generator" timer (level 2) when the model config has
    megatron timers (--timing-log-level), as in Megatron-LM's pretrain_gpt."""
    from megatron.core.utils import get_model_config

    timers = get_model_config(model).timers
    if timers is not None:
        timers("batch-generator", log_level=2).start()
    batch = next(data_iterator)
    device = next(model.parameters()).device
    batch = {key: batch[key].to(device) for key in ("tokens", "position_ids", "labels",
                                                     "loss_mask")}
    if timers is not None:
        timers("batch-generator").stop()
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor,
              ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Masked token loss; reports ``"lm loss"`` as [loss sum, token count] so any reduction
    over micro-batches and ranks stays token-weighted."""
    mask = loss_mask.view(-1).float()
    total = torch.sum(per_token_loss.view(-1).float() * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([total.detach(), mask.sum()])
    # The 3-tuple form: megatron divides by num_tokens and the number of micro-batches.
    return total, num_tokens, {"lm loss": report}


def forward_backward(chunks: list, data_iterator: Any, *, num_microbatches: int,
                     seq_length: int, micro_batch_size: int, forward_only: bool) -> list[dict]:
    """One call of megatron's schedule (no pipelining, 1F1B or interleaved, as the parallel
    state says) over ``num_microbatches`` micro-batches with :func:`forward_step`: a training
    step's forward and backward, or an evaluation's forwards. Returns the loss reports (on
    the last pipeline stage)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data_iterator, model=chunks,
        num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, decoder_seq_length=seq_length,
        forward_only=forward_only)


def loss_sums(reports: list[dict]) -> torch.Tensor:
    """float64 [loss sum, token count] of this rank's loss reports (reduce over ranks, then
    divide, for the token-weighted mean)."""
    sums = torch.zeros(2, dtype=torch.float64)
    for report in reports:
        sums += report["lm loss"].detach().to(device="cpu", dtype=torch.float64)
    return sums
