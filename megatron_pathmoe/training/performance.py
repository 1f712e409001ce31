"""Megatron-LM's performance switches that belong to the training run rather than to the
model: overlap of the gradient reduce and the parameter gather with compute. (Activation
recomputation and the MoE capacity/dtype switches are model fields: ``PathMoEConfig``.)"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields


@dataclass
class PerformanceConfig:
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "PerformanceConfig":
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})


def add_performance_args(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's flags for recomputation, communication overlap and the MoE kernels."""
    g = parser.add_argument_group("performance")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="overlap the data-parallel gradient reduce with the backward pass")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="with --use-distributed-optimizer: overlap the parameter all-gather "
                        "with the next forward pass")


def validate_performance(perf: PerformanceConfig, use_distributed_optimizer: bool) -> None:
    """Checks that need no process group; raises ``ConfigError`` naming the flag."""
