"""One config object for model, routing and parallel layout.

It is validated before any process group exists (so a bad flag costs a one-line error, not a
torchrun crash on every rank) and maps onto megatron-core's ``TransformerConfig``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

ROUTING_CHOICES = ("independent", "path")
DISPATCHER_CHOICES = ("alltoall", "allgather")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the flag and the fix."""


@dataclass
class PathMoEConfig:
    # Model shape (paper, Appendix B: RMSNorm, SwiGLU experts, RoPE, GQA).
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # None: multi-head attention; < heads: GQA
    moe_ffn_hidden_size: int = 256
    seq_length: int = 256
    vocab_size: int = 4096
    rotary_base: int = 10000
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    untie_embeddings_and_output_weights: bool = True
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    bf16: bool = False

    # Mixture of experts.
    num_experts: int = 8
    moe_router_topk: int = 2
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: float | None = None
    moe_router_pre_softmax: bool = True  # softmax over all experts, then top-k (paper eq. 3.1-3.2)
    moe_token_dispatcher_type: str = "alltoall"

    # Routing variant.
    routing: str = "path"
    path_block_size: int = 4

    # Parallel layout.
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False

    def validate(self, world_size: int | None = None) -> "PathMoEConfig":
        """Raise :class:`ConfigError` naming the offending flag; returns self for chaining."""
        _require(self.num_layers > 0, "--num-layers must be positive")
        _require(self.hidden_size % self.num_attention_heads == 0,
                 f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                 f"{self.num_attention_heads}; pick heads that divide it")
        groups = self.num_query_groups or self.num_attention_heads
        _require(self.num_attention_heads % groups == 0,
                 f"--num-query-groups {groups} must divide --num-attention-heads "
                 f"{self.num_attention_heads}")
        _require(self.num_experts >= 1, "--num-experts must be at least 1")
        _require(1 <= self.moe_router_topk <= self.num_experts,
                 f"--moe-router-topk {self.moe_router_topk} must be between 1 and --num-experts "
                 f"{self.num_experts}")
        _require(self.moe_aux_loss_coeff >= 0, "--moe-aux-loss-coeff must be >= 0")
        _require(self.routing in ROUTING_CHOICES,
                 f"--routing {self.routing!r} is unknown; choose one of {', '.join(ROUTING_CHOICES)}")
        _require(self.moe_token_dispatcher_type in DISPATCHER_CHOICES,
                 f"--moe-token-dispatcher-type must be one of {', '.join(DISPATCHER_CHOICES)}")
        if self.routing == "path":
            _require(self.path_block_size >= 1, "--path-block-size must be at least 1")
            _require(self.num_layers % self.path_block_size == 0,
                     f"--path-block-size {self.path_block_size} does not divide --num-layers "
                     f"{self.num_layers}; use a divisor of {self.num_layers} "
                     f"(e.g. {_divisors(self.num_layers)})")
        self._validate_parallel(world_size)
        return self

    def _validate_parallel(self, world_size: int | None) -> None:
        tp, pp, ep = (self.tensor_model_parallel_size, self.pipeline_model_parallel_size,
                      self.expert_model_parallel_size)
        _require(min(tp, pp, ep) >= 1, "parallel sizes must be >= 1")
        _require(self.num_experts % ep == 0,
                 f"--num-experts {self.num_experts} is not divisible by "
                 f"--expert-model-parallel-size {ep}; use an EP size that divides the experts")
        _require(self.num_layers % pp == 0,
                 f"--num-layers {self.num_layers} is not divisible by "
                 f"--pipeline-model-parallel-size {pp}")
        _require(self.num_attention_heads % tp == 0 and
                 (self.num_query_groups or self.num_attention_heads) % tp == 0,
                 f"--tensor-model-parallel-size {tp} must divide the attention heads and "
                 "query groups")
        _require(tp == 1 or self.sequence_parallel,
                 "MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel")
        if world_size is not None:
            _require(world_size % (tp * pp) == 0,
                     f"world size {world_size} is not divisible by TP*PP = {tp * pp}; launch a "
                     "multiple of it with torchrun --nproc_per_node/--nnodes")
            dp = world_size // (tp * pp)
            _require((dp * tp) % ep == 0,
                     f"--expert-model-parallel-size {ep} must divide DP*TP = {dp * tp} "
                     f"(world size {world_size})")

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def to_transformer_config(self) -> Any:
        """The megatron-core ``TransformerConfig`` for this model."""
        from megatron.core.transformer.transformer_config import TransformerConfig

        aux = self.moe_aux_loss_coeff > 0
        return TransformerConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.moe_ffn_hidden_size,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_epsilon,
            gated_linear_unit=True,
            activation_func=torch.nn.functional.silu,
            add_bias_linear=False,
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            apply_rope_fusion=False,
            persist_layer_norm=False,
            gradient_accumulation_fusion=False,
            attention_dropout=self.attention_dropout,
            hidden_dropout=self.hidden_dropout,
            init_method_std=self.init_method_std,
            bf16=self.bf16,
            params_dtype=self.params_dtype,
            pipeline_dtype=self.params_dtype,
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            expert_model_parallel_size=self.expert_model_parallel_size,
            expert_tensor_parallel_size=1,
            sequence_parallel=self.sequence_parallel,
            num_moe_experts=self.num_experts,
            moe_ffn_hidden_size=self.moe_ffn_hidden_size,
            moe_router_topk=self.moe_router_topk,
            moe_router_pre_softmax=self.moe_router_pre_softmax,
            moe_router_load_balancing_type="aux_loss" if aux else "none",
            moe_aux_loss_coeff=self.moe_aux_loss_coeff,
            moe_z_loss_coeff=self.moe_z_loss_coeff,
            moe_token_dispatcher_type=self.moe_token_dispatcher_type,
            moe_router_dtype="fp32",
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
            moe_router_fusion=False,
            # Per-layer logging needs a layer number; keep megatron's own tracker.
            moe_per_layer_logging=True,
            calculate_per_token_loss=False,
        )

    def replace(self, **changes: Any) -> "PathMoEConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
