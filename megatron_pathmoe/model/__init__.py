"""Layer specs, the GPTModel builder and its forward step."""

from megatron_pathmoe.model.builder import (
    ParameterCounts,
    build_gpt_model,
    build_model_chunks,
    count_parameters,
)
from megatron_pathmoe.model.forward import forward_backward, forward_step, loss_sums
from megatron_pathmoe.model.spec import decoder_block_spec, moe_layer_spec

__all__ = [
    "ParameterCounts",
    "build_gpt_model",
    "build_model_chunks",
    "count_parameters",
    "decoder_block_spec",
    "forward_backward",
    "forward_step",
    "loss_sums",
    "moe_layer_spec",
]
