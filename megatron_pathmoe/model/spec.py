"""Layer spec assembly: megatron-core's GPT layer with our router builder and norm."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from megatron_pathmoe.config import ConfigError, PathMoEConfig
from megatron_pathmoe.model.norm import RMSNorm
from megatron_pathmoe.platform.profiling import RANGE_EXPERT_COMPUTE, profile_range
from megatron_pathmoe.routing import build_router_builder


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # TE raises RuntimeError, not ImportError, on machines without CUDA
        return False
    return True


def moe_layer_spec(config: PathMoEConfig, use_transformer_engine: bool = False) -> ModuleSpec:
    """One decoder layer: attention (RoPE, GQA), RMSNorm, MoE with SwiGLU experts, and the
    router selected by ``config.routing`` plugged in at ``MoESubmodules.router``. The experts
    are megatron's ``SequentialMLP`` (one GEMM per expert), or with ``--moe-grouped-gemm``
    transformer-engine's ``TEGroupedMLP``."""
    if config.moe_grouped_gemm and not use_transformer_engine:
        raise ConfigError("--moe-grouped-gemm needs --transformer-impl transformer_engine (the "
                          "local spec's grouped GEMM needs the GPU-only grouped_gemm package); "
                          "drop the flag to run the experts one by one")
    if use_transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=config.num_experts, moe_grouped_gemm=config.moe_grouped_gemm,
            qk_layernorm=config.qk_layernorm)
    else:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        spec = get_gpt_layer_local_spec(num_experts=config.num_experts, moe_grouped_gemm=False,
                                        normalization="RMSNorm")
        spec.submodules.input_layernorm = RMSNorm
        spec.submodules.pre_mlp_layernorm = RMSNorm
        qk_norm = RMSNorm if config.qk_layernorm else IdentityOp  # per head, before RoPE
        spec.submodules.self_attention.submodules.q_layernorm = qk_norm
        spec.submodules.self_attention.submodules.k_layernorm = qk_norm
    spec.submodules.mlp.submodules.router = build_router_builder(config)
    experts = spec.submodules.mlp.submodules.experts
    experts.module = _with_expert_range(experts.module)
    return spec


@lru_cache(maxsize=None)
def _with_expert_range(experts_class: type) -> type:
    """megatron's experts module (SequentialMLP, TEGroupedMLP) with its calls marked as the
    expert-compute profiler range; state dicts and checkpoints are the parent class's."""
    def __call__(self, *args: Any, **kwargs: Any):
        with profile_range(RANGE_EXPERT_COMPUTE):
            return experts_class.__call__(self, *args, **kwargs)

    return type(experts_class.__name__, (experts_class,), {"__call__": __call__,
                                                           "__module__": __name__})


def decoder_block_spec(config: PathMoEConfig, transformer_config: Any,
                       use_transformer_engine: bool = False,
                       vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """The layers this pipeline stage builds, sharing one router builder (so ties within a
    stage resolve), plus the final norm."""
    layer = moe_layer_spec(config, use_transformer_engine)
    num_local = get_num_layers_to_build(transformer_config, vp_stage=vp_stage)
    final_norm: Any = RMSNorm
    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    return TransformerBlockSubmodules(layer_specs=[layer] * num_local, layer_norm=final_norm)
