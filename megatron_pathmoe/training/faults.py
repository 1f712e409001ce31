"""Faults during training: non-finite losses and gradients, and reproducible fault injection.

``NonFiniteGuard`` runs between the backward pass and the optimizer step. It checks the global
loss and every rank's gradient buffers, and when either is NaN/Inf it names the iteration and
the first MoE layer whose router saw or produced non-finite values (forward hooks record that
per micro-batch without a host sync), then stops the run or skips the optimizer step.

``FaultInjector`` reads ``PATHMOE_FAULT_INJECT`` (comma-separated, for tests and drills):

* ``nan_at=ITER[:layer=L]``   make the router input of MoE layer L (default 1) NaN at ITER;
* ``fail_at=ITER[:rank=R]``   raise on global rank R (default 0) at the start of ITER;
* ``slow_save=SECONDS``       sleep after a checkpoint's shards are written, before it is
                              published, so a kill "during save" is reproducible.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_pathmoe.routing import RouterHooks, routers_of
from megatron_pathmoe.runtime import all_reduce_to_cpu, warn
from megatron_pathmoe.training.arguments import NONFINITE_ACTIONS

FAULT_ENV = "PATHMOE_FAULT_INJECT"


class NonFiniteError(RuntimeError):
    """The loss or the gradients became NaN/Inf and the run was told to stop."""


class InjectedFault(RuntimeError):
    """Raised by ``fail_at`` fault injection."""


def _all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    return all_reduce_to_cpu(tensor, dist.ReduceOp.MAX)


class NonFiniteGuard(RouterHooks):
    """Detects NaN/Inf loss or gradients before the optimizer step and locates the layer."""

    def __init__(self, chunks: list, num_layers: int, action: str, max_skipped: int) -> None:
        super().__init__()
        if action not in NONFINITE_ACTIONS:
            raise ValueError(f"--nonfinite-action must be stop or skip, got {action!r}")
        self.chunks, self.action, self.max_skipped = chunks, action, max_skipped
        self.consecutive_skips = 0
        # Per layer: [router input non-finite, router output non-finite], OR-ed over
        # micro-batches on the activations' device (read only when a step goes bad).
        self.num_layers = num_layers
        self._flags: torch.Tensor | None = None
        self.hook_forward(routers_of(chunks), self._record)

    def _record(self, router, inputs, output) -> None:
        if router.layer_number is None or not torch.is_grad_enabled():
            return
        if self._flags is None:
            self._flags = torch.zeros(self.num_layers, 2, dtype=torch.bool,
                                      device=inputs[0].device)
        row = self._flags[router.layer_number - 1]
        row[0] |= ~torch.isfinite(inputs[0]).all()
        row[1] |= ~torch.isfinite(output[0]).all()

    def _grads_nonfinite(self) -> bool:
        bad = [(~torch.isfinite(buffer.grad_data).all()).reshape(1)
               for chunk in self.chunks
               for buffer in (getattr(chunk, "buffers", [])  # megatron DDP's grad buffers
                              + getattr(chunk, "expert_parallel_buffers", []))]
        local = torch.cat(bad).any().cpu() if bad else torch.tensor(False)
        return bool(_all_reduce_max(local.reshape(1).to(torch.uint8)).item())

    def _culprit(self) -> str:
        if self._flags is None:
            return "no router ran"
        flags = _all_reduce_max(self._flags.to(torch.uint8)).bool()
        for layer, (bad_in, bad_out) in enumerate(flags.tolist(), start=1):
            if bad_in:
                return f"non-finite hidden states already reached the router of MoE layer {layer}"
            if bad_out:
                return f"first produced by the router of MoE layer {layer}"
        return "no router saw non-finite values (look at the loss / output layer)"

    def should_step(self, iteration: int, loss: float) -> bool:
        """True when the step is healthy; otherwise report, then skip (False) or raise."""
        try:
            grads_bad = self._grads_nonfinite()
            if torch.isfinite(torch.tensor(loss)) and not grads_bad:
                self.consecutive_skips = 0
                return True
            what = f"loss {loss}" + (", non-finite gradients" if grads_bad else "")
            message = f"non-finite values at iteration {iteration} ({what}); {self._culprit()}"
        finally:
            if self._flags is not None:
                self._flags.zero_()
        self.consecutive_skips += 1
        if self.action == "stop":
            raise NonFiniteError(message + "; stopping (--nonfinite-action stop): the newest "
                                 "checkpoint is the last good state")
        if self.consecutive_skips > self.max_skipped:
            raise NonFiniteError(message + f"; {self.consecutive_skips} consecutive skipped "
                                 "steps exceed --max-skipped-steps, stopping")
        warn(f"{message}; skipping the optimizer step")
        return False


@dataclass
class FaultInjector:
    nan_at: int | None = None
    nan_layer: int = 1
    fail_at: int | None = None
    fail_rank: int = 0
    slow_save_seconds: float = 0.0

    @classmethod
    def from_env(cls) -> "FaultInjector":
        spec = os.environ.get(FAULT_ENV, "").strip()
        injector = cls()
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, _, rest = item.partition("=")
            value, _, option = rest.partition(":")
            try:
                if name == "nan_at":
                    injector.nan_at = int(value)
                    injector.nan_layer = int(option.removeprefix("layer=") or 1)
                elif name == "fail_at":
                    injector.fail_at = int(value)
                    injector.fail_rank = int(option.removeprefix("rank=") or 0)
                elif name == "slow_save":
                    injector.slow_save_seconds = float(value)
                else:
                    raise ValueError(name)
            except ValueError:
                raise ValueError(f"{FAULT_ENV}: cannot parse {item!r}; expected nan_at=ITER"
                                 "[:layer=L], fail_at=ITER[:rank=R] or slow_save=SECONDS") from None
        return injector

    def before_step(self, iteration: int, chunks: list) -> RouterHooks:
        """Apply this iteration's faults; returns the hooks to remove after the step."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        if self.fail_at == iteration and rank == self.fail_rank:
            raise InjectedFault(f"injected failure on rank {rank} at iteration {iteration}")
        hooks = RouterHooks()
        if self.nan_at == iteration:
            hooks.hook_pre_forward([r for r in routers_of(chunks)
                                    if r.layer_number == self.nan_layer], _poison_input)
        return hooks

    def during_save(self) -> None:
        if self.slow_save_seconds:
            time.sleep(self.slow_save_seconds)


def _poison_input(router, inputs):
    return (inputs[0] * float("nan"), *inputs[1:])
