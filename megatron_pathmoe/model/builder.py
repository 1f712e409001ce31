"""Build megatron-core's GPTModel for a PathMoE config."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_pathmoe.config import PathMoEConfig
from megatron_pathmoe.model.spec import decoder_block_spec
from megatron_pathmoe.ops import install_permute_impl


def build_gpt_model(config: PathMoEConfig, *, use_transformer_engine: bool = False,
                    vp_stage: int | None = None, use_cpu_initialization: bool = False,
                    permute_impl: str | None = None, device: str | None = None) -> GPTModel:
    """A GPTModel (RMSNorm, SwiGLU experts, RoPE or none, GQA, no biases; Appendix B of the
    paper) holding this
    rank's pipeline stage (virtual stage ``vp_stage`` of it under an interleaved pipeline).
    Needs initialised model-parallel state. ``use_cpu_initialization`` draws every
    tensor-parallel weight whole and keeps this rank's slice, so TP layouts start from the
    weights TP=1 draws. ``permute_impl`` (``--permute-impl``, see ``megatron_pathmoe.ops``)
    is installed for ``device`` first; None keeps the one installed."""
    if permute_impl is not None:
        install_permute_impl(permute_impl, device)
    transformer_config = config.to_transformer_config()
    transformer_config.use_cpu_initialization = use_cpu_initialization
    pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return GPTModel(
        config=transformer_config,
        transformer_layer_spec=decoder_block_spec(config, transformer_config,
                                                  use_transformer_engine, vp_stage),
        vocab_size=config.padded_vocab_size,
        max_sequence_length=config.max_position_embeddings or config.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not config.untie_embeddings_and_output_weights,
        position_embedding_type=config.position_embedding_type,
        rotary_percent=config.rotary_percent,
        rotary_base=config.rotary_base,
        parallel_output=True,
        vp_stage=vp_stage,
    )


def build_model_chunks(config: PathMoEConfig, *, use_transformer_engine: bool = False,
                       use_cpu_initialization: bool = False, permute_impl: str | None = None,
                       device: str | None = None) -> list[GPTModel]:
    """This rank's model chunks: one per virtual pipeline stage (one without interleaving)."""
    if permute_impl is not None:
        install_permute_impl(permute_impl, device)
    vpp = config.virtual_pipeline_model_parallel_size
    stages = [None] if vpp is None else list(range(vpp))
    return [build_gpt_model(config, use_transformer_engine=use_transformer_engine, vp_stage=v,
                            use_cpu_initialization=use_cpu_initialization) for v in stages]


@dataclass
class ParameterCounts:
    total: int
    active: int
    router: int
    expert: int


def count_parameters(model: torch.nn.Module, config: PathMoEConfig) -> ParameterCounts:
    """Counts of this rank's parameters (each shared tensor once): total, active per token
    (non-expert + top-k of E experts), router."""
    total = router = expert = 0
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        if ".router." in name:
            router += n
        elif ".experts." in name:
            expert += n
    active = total - expert + expert * config.moe_router_topk // config.num_experts
    return ParameterCounts(total=total, active=active, router=router, expert=expert)
