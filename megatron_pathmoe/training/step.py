"""One training step and one validation pass, both global batches through the same
forward/backward call (``megatron_pathmoe.model.forward_backward``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from megatron_pathmoe.config import PathMoEConfig
from megatron_pathmoe.model import forward_backward, loss_sums
from megatron_pathmoe.monitoring import timers_paused
from megatron_pathmoe.runtime import all_reduce_to_cpu
from megatron_pathmoe.training.arguments import TrainingConfig


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    skipped: bool


def _batch_sums(chunks: list, data_iterator, model_cfg: PathMoEConfig, train: TrainingConfig,
                num_microbatches: int, *, forward_only: bool) -> torch.Tensor:
    """One global batch through megatron's schedule (backward too unless ``forward_only``):
    this rank's [loss sum, tokens]."""
    return loss_sums(forward_backward(chunks, data_iterator, num_microbatches=num_microbatches,
                                      seq_length=model_cfg.seq_length,
                                      micro_batch_size=train.micro_batch_size,
                                      forward_only=forward_only))


def _global_mean(sums: torch.Tensor) -> float:
    """Token-weighted mean loss over all ranks. Only last-stage ranks hold loss reports; the
    all-reduce gives every rank the same number (TP duplicates cancel in the ratio)."""
    sums = all_reduce_to_cpu(sums)
    return float(sums[0] / sums[1].clamp_min(1))


def train_step(chunks: list[Any], optimizer: Any, scheduler: Any, data_iterator: Any,
               model_cfg: PathMoEConfig,
               train: TrainingConfig, num_microbatches: int,
               should_step: Callable[[float], bool] | None = None,
               global_batch_size: int | None = None) -> StepResult:
    """One global batch (``global_batch_size`` samples: a ramp-up step's, default
    ``--global-batch-size``). ``should_step(loss)`` (the non-finite guard) runs between
    backward and the optimizer step and may veto the step."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    loss = _global_mean(_batch_sums(chunks, data_iterator, model_cfg, train, num_microbatches,
                                    forward_only=False))
    if should_step is not None and not should_step(loss):
        return StepResult(loss=loss, grad_norm=float("nan"), lr=optimizer.param_groups[0]["lr"],
                          skipped=True)
    updated, grad_norm = _optimizer_step(optimizer, chunks[0].config.timers)
    if updated:
        scheduler.step(increment=train.lr_schedule().step_increment(
            global_batch_size or train.global_batch_size))
    return StepResult(loss=loss, grad_norm=float(grad_norm or 0.0),
                      lr=optimizer.param_groups[0]["lr"], skipped=not updated)


def _optimizer_step(optimizer, timers) -> tuple[bool, float | None]:
    """optimizer.step() inside the "optimizer" timer (level 1, as Megatron-LM's train_step)
    when --timing-log-level is on."""
    if timers is not None:
        timers("optimizer", log_level=1).start(barrier=optimizer.config.barrier_with_L1_time)
    updated, grad_norm, _ = optimizer.step()
    if timers is not None:
        timers("optimizer").stop()
    return updated, grad_norm


@torch.no_grad()
def evaluate(chunks: list[Any], data_iterator: Any, model_cfg: PathMoEConfig,
             train: TrainingConfig,
             num_microbatches: int) -> float:
    """Mean validation loss (nats/token) over ``--eval-iters`` global batches (untimed, as
    in Megatron-LM: the timers measure training iterations)."""
    for chunk in chunks:
        chunk.eval()
    with timers_paused(chunks):
        sums = sum(_batch_sums(chunks, data_iterator, model_cfg, train, num_microbatches,
                               forward_only=True) for _ in range(train.eval_iters))
    for chunk in chunks:
        chunk.train()
    return _global_mean(sums)
