"""The step profiler's Chrome trace holds PathMoE's named ranges; memory scalars."""

from __future__ import annotations

import json

import torch

from megatron_pathmoe.monitoring import MonitoringConfig, StepProfiler, memory_scalars
from megatron_pathmoe.monitoring.profiler import RANGES, profile_range


def _toy_step(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Enters each named range the way the MoE layer and the tie all-reduce will."""
    routing, permutation, experts, tie = RANGES
    with profile_range(routing):
        top = (x @ w).topk(2, dim=-1).indices
    with profile_range(permutation):
        order = top[:, 0].argsort()
        permuted = x[order]
    with profile_range(experts):
        out = torch.nn.functional.silu(permuted @ w.T) * 2
    with profile_range(tie):
        out = out + 0
    return out


def test_trace_loads_and_holds_the_ranges_of_the_profiled_steps_only(tmp_path):
    cfg = MonitoringConfig(profile=True, profile_step_start=2, profile_step_end=4,
                           profile_ranks=[0])
    profiler = StepProfiler(cfg, str(tmp_path), rank=0)
    x, w = torch.randn(64, 16), torch.randn(16, 16)
    for iteration in range(1, 7):
        profiler.step(iteration)
        with profile_range(f"step{iteration}"):
            _toy_step(x, w)
    assert profiler.close() is None  # already written at iteration 4
    trace = json.load(open(profiler.path))
    names = [event.get("name") for event in trace["traceEvents"]]
    for name in RANGES:
        assert names.count(name) == 2, name  # iterations 2 and 3
    assert {"step2", "step3"} <= set(names) and not {"step1", "step4"} & set(names)


def test_other_ranks_are_not_profiled(tmp_path):
    cfg = MonitoringConfig(profile=True, profile_step_start=0, profile_step_end=1)
    profiler = StepProfiler(cfg, str(tmp_path), rank=1)
    profiler.step(0)
    assert profiler.close() is None and not list(tmp_path.iterdir())


def test_memory_scalars_on_cpu():
    scalars = memory_scalars("cpu")
    assert set(scalars) == {"mem-rss-bytes", "mem-max-rss-bytes"}
    assert 0 < scalars["mem-rss-bytes"] <= scalars["mem-max-rss-bytes"]
