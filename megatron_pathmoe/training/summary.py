"""The run summary (``--summary-json``; the study and the tests read its fields), built from
the metrics window's history."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from megatron_pathmoe.runtime import is_rank0, log
from megatron_pathmoe.training.metrics import MetricsWindow


@dataclass
class RunSummary:
    routing: str
    path_block_size: int | None  # the router block size (None: a variant without blocks)
    iterations: int
    final_train_loss: float | None
    valid_loss: float | None  # None: the run exited early (exit_reason), before validating
    valid_perplexity: float | None
    tokens_per_second: float | None
    mean_step_seconds: float | None
    parameters: dict[str, int]
    final_expert_load_max: list[float] = field(default_factory=list)
    final_expert_load_min: list[float] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    aux_losses: dict[str, float] = field(default_factory=dict)
    start_iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: list[int] = field(default_factory=list)
    world_size: int = 1
    peak_memory_gib: float | None = None  # max over ranks; see metrics.peak_memory_gib
    # ops.permute_impl_report(): requested/installed permutation, fallback, self-checks
    permute_impl: dict = field(default_factory=dict)
    test_loss: float | None = None  # --test-data-path
    test_perplexity: float | None = None
    exit_reason: str | None = None  # why the run saved and exited before --train-iters
    manual_gc_collections: int | None = None  # --manual-gc: collections this rank ran


def _exp(loss: float | None) -> float | None:
    return None if loss is None else math.exp(loss)


def build_summary(window: MetricsWindow, run: dict, valid_loss: float | None,
                  test_loss: float | None = None) -> RunSummary:
    """``run``: the fields the window does not know (routing, path_block_size, iterations,
    parameters, start_iteration, consumed_samples, world_size, peak_memory_gib,
    permute_impl, exit_reason, manual_gc_collections)."""
    step = window.steady_step_seconds()
    load = window.load
    return RunSummary(
        **run, final_train_loss=window.losses[-1] if window.losses else None,
        valid_loss=valid_loss, valid_perplexity=_exp(valid_loss),
        test_loss=test_loss, test_perplexity=_exp(test_loss),
        tokens_per_second=window.steady_tokens_per_second() if step else None,
        mean_step_seconds=step,
        final_expert_load_max=[round(float(r.max()), 4) for r in load] if load is not None else [],
        final_expert_load_min=[round(float(r.min()), 4) for r in load] if load is not None else [],
        train_losses=window.losses, grad_norms=window.grad_norms, aux_losses=window.aux_means,
        skipped_iterations=window.skipped)


def log_summary(summary: RunSummary) -> None:
    """The run's final log line."""
    speed = (f" | steady-state {summary.tokens_per_second:,.0f} tokens/s "
             f"({1000 * summary.mean_step_seconds:.0f} ms/iter)"
             if summary.mean_step_seconds is not None else "")
    valid = (f"validation: loss {summary.valid_loss:.4f} | perplexity "
             f"{summary.valid_perplexity:.2f}" if summary.valid_loss is not None
             else f"exited at iteration {summary.start_iteration + len(summary.train_losses)}")
    log(f"{valid}{speed} | peak memory {summary.peak_memory_gib:.2f} GiB per rank")


def write_summary(summary: RunSummary, path: str | None) -> None:
    """``--summary-json`` (rank 0; nothing without a path)."""
    if path and is_rank0():
        with open(path, "w") as f:
            json.dump(summary.__dict__, f, indent=2)
