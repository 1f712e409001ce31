"""A torch.profiler trace of a few training steps, and the named ranges PathMoE marks.

The trainer calls ``StepProfiler.step(iteration)`` at the start of every iteration: profiling
runs over iterations [--profile-step-start, --profile-step-end) on the --profile-ranks and
writes one Chrome-format trace (chrome://tracing, https://ui.perfetto.dev) per rank. Code
that routes, permutes, runs experts or all-reduces tied routers wraps itself in
``profile_range(RANGE_...)`` so these phases show up by name (a shared no-op
context when no profiler is active; the names live in ``platform.profiling`` so the model
core can use them).
"""

from __future__ import annotations

import os

import torch

from megatron_pathmoe.monitoring.arguments import MonitoringConfig
from megatron_pathmoe.platform.profiling import (  # noqa: F401 (re-exported)
    RANGE_EXPERT_COMPUTE,
    RANGE_PERMUTATION,
    RANGE_ROUTING,
    RANGE_TIE_ALLREDUCE,
    RANGES,
    profile_range,
)


class StepProfiler:
    """Profiles iterations [start, end) on the chosen ranks; inert elsewhere."""

    def __init__(self, cfg: MonitoringConfig, out_dir: str, rank: int) -> None:
        self.enabled = cfg.profile and rank in cfg.profile_ranks
        self.start, self.end = cfg.profile_step_start, cfg.profile_step_end
        self.path = os.path.join(out_dir, f"profile_rank{rank}_iter{self.start}-{self.end}.json")
        self._profiler: torch.profiler.profile | None = None

    def step(self, iteration: int) -> None:
        """Call at the start of ``iteration``, before its forward."""
        if not self.enabled:
            return
        if iteration == self.start and self._profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.start()
        elif iteration >= self.end:
            self.close()

    def close(self) -> str | None:
        """Stop and write the trace if profiling is under way; returns its path."""
        if self._profiler is None:
            return None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._profiler.stop()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._profiler.export_chrome_trace(self.path)
        self._profiler, self.enabled = None, False
        return self.path
