"""The named profiler ranges PathMoE marks (routing, permutation, expert compute, tie
all-reduce). They live here, at the bottom layer, so the model core can mark its own call
sites; ``megatron_pathmoe.monitoring.profiler`` re-exports them and runs the profiler."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

RANGE_ROUTING = "pathmoe/routing"            # router logits, top-k, aux losses
RANGE_PERMUTATION = "pathmoe/permutation"    # token permute / unpermute around the experts
RANGE_EXPERT_COMPUTE = "pathmoe/expert_compute"  # the experts' SwiGLU MLPs
RANGE_TIE_ALLREDUCE = "pathmoe/tie_allreduce"    # gradient all-reduce of tied routers
RANGES = (RANGE_ROUTING, RANGE_PERMUTATION, RANGE_EXPERT_COMPUTE, RANGE_TIE_ALLREDUCE)

_NOTHING = nullcontext()


def profile_range(name: str) -> AbstractContextManager:
    """A named range in the profiler trace (use the RANGE_* names). Without an active
    profiler it is a shared no-op context: record_function would still call into the
    dispatcher on every enter/exit."""
    if not torch._C._autograd._profiler_enabled():
        return _NOTHING
    return torch.profiler.record_function(name)
