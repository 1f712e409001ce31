"""Megatron-LM's performance switches: overlap of the gradient reduce and the parameter gather
with compute (training-run settings, ``PerformanceConfig``), and the model-side switches
whose values land in ``PathMoEConfig`` fields of the same name (activation recomputation, the
router dtype, load-balancing type, expert capacity and token dropping, transformer-engine's
grouped GEMM and fused permutation). ``PathMoEConfig.validate`` checks the latter."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from megatron_pathmoe.config import (
    LOAD_BALANCING_CHOICES,
    RECOMPUTE_GRANULARITY_CHOICES,
    RECOMPUTE_METHOD_CHOICES,
    RECOMPUTE_MODULE_CHOICES,
    ROUTER_DTYPE_CHOICES,
    TOKEN_DROP_POLICY_CHOICES,
    ConfigError,
    PathMoEConfig,
    dataclass_from_namespace,
)


@dataclass
class PerformanceConfig:
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # megatron DDP bucket size in parameters (None: megatron's default, max(40M, 1M x DP)).
    ddp_bucket_size: int | None = None
    # Pipeline stages start their grad reduces (interleaved: their param gathers) together, from
    # the schedule (Megatron-LM's default); False: each bucket's own hook starts them.
    align_grad_reduce: bool = True
    align_param_gather: bool = True

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "PerformanceConfig":
        return dataclass_from_namespace(cls, ns)


def add_performance_args(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's flags for recomputation, communication overlap and the MoE kernels."""
    m = PathMoEConfig()
    g = parser.add_argument_group("performance")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="overlap the data-parallel gradient reduce with the backward pass")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="with --use-distributed-optimizer: overlap the parameter all-gather "
                        "with the next forward pass")
    g.add_argument("--ddp-bucket-size", type=int, default=None,
                   help="parameters per gradient-reduce bucket (default: megatron's)")
    g.add_argument("--no-align-grad-reduce", dest="align_grad_reduce", action="store_false",
                   help="with --overlap-grad-reduce: each pipeline stage starts its gradient "
                        "reduces when its buckets are ready, not all stages together from the "
                        "schedule")
    g.add_argument("--no-align-param-gather", dest="align_param_gather", action="store_false",
                   help="with --overlap-param-gather and an interleaved pipeline: each chunk's "
                        "forward pre-hooks start its parameter all-gathers, not the schedule")
    _recompute_args(g)
    _moe_kernel_args(g, m)


def _recompute_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--recompute-granularity", choices=RECOMPUTE_GRANULARITY_CHOICES,
                   default=None,
                   help="activation recomputation: full = whole layers (needs "
                        "--recompute-method and --recompute-num-layers), selective = the "
                        "--recompute-modules")
    g.add_argument("--recompute-method", choices=RECOMPUTE_METHOD_CHOICES, default=None,
                   help="full recompute: uniform = chunks of --recompute-num-layers layers, "
                        "block = the first --recompute-num-layers layers of each stage")
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--recompute-modules", nargs="*", default=None,
                   help=f"selective recompute: any of {' '.join(RECOMPUTE_MODULE_CHOICES)} "
                        "(default core_attn)")


def _moe_kernel_args(g: argparse._ArgumentGroup, m: PathMoEConfig) -> None:
    g.add_argument("--moe-router-dtype", choices=ROUTER_DTYPE_CHOICES,
                   default=m.moe_router_dtype,
                   help="dtype of the routing math (logits, scores, aux losses)")
    g.add_argument("--moe-router-load-balancing-type", choices=LOAD_BALANCING_CHOICES,
                   default=m.moe_router_load_balancing_type,
                   help="which load-balancing loss --moe-aux-loss-coeff weighs: aux_loss (per "
                        "micro-batch), seq_aux_loss (per sequence), global_aux_loss (over the "
                        "global batch), none (off whatever the coefficient), sinkhorn "
                        "(S-BASE: training picks the top-k of Sinkhorn-balanced scores; no aux "
                        "loss)")
    g.add_argument("--moe-expert-capacity-factor", type=float, default=None,
                   help="expert capacity = factor x tokens x top-k / experts; routed tokens "
                        "over it are dropped (default: dropless)")
    g.add_argument("--moe-pad-expert-input-to-capacity", action="store_true",
                   help="pad every expert's input to its capacity (fixed shapes)")
    g.add_argument("--moe-token-drop-policy", choices=TOKEN_DROP_POLICY_CHOICES,
                   default=m.moe_token_drop_policy,
                   help="over capacity, keep an expert's highest-probability tokens (probs) "
                        "or its first tokens (position)")
    g.add_argument("--moe-grouped-gemm", action="store_true",
                   help="transformer-engine's grouped GEMM for the experts (GPU, "
                        "--transformer-impl transformer_engine)")
    g.add_argument("--moe-permute-fusion", action="store_true",
                   help="transformer-engine's fused token permutation (GPU); replaces "
                        "--permute-impl's permutation")


def validate_performance(perf: PerformanceConfig, use_distributed_optimizer: bool) -> None:
    """Checks that need no process group; raises ``ConfigError`` naming the flag."""
    if perf.overlap_param_gather and not use_distributed_optimizer:
        raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer (without "
                          "it parameters are not gathered); add it or drop the flag")
    if perf.overlap_param_gather and not perf.overlap_grad_reduce:
        raise ConfigError("--overlap-param-gather needs --overlap-grad-reduce (as in "
                          "Megatron-LM); add it")
    if perf.ddp_bucket_size is not None and perf.ddp_bucket_size < 1:
        raise ConfigError("--ddp-bucket-size must be at least 1")
