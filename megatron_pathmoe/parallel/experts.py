"""Expert gradients under tensor parallelism without expert parallelism.

Experts here are never tensor-parallel (expert-TP = 1), so with TP > 1 every TP rank runs the
full experts on its own sequence-parallel shard of the tokens, and the expert gradients must be
summed over the TP ranks as well as the data-parallel ranks: over megatron's expert
data-parallel group (world / (PP x EP)). megatron-core 0.16.1 sends an expert parameter there
only when ``expert_model_parallel_size > 1`` (its ``allreduce`` attribute); with EP = 1 it
reduces it over the dense data-parallel group, which leaves out the TP ranks, so the expert
copies on the TP ranks silently drift apart. Tagging the experts as megatron does for EP > 1
takes the same, tested path (DDP expert buffers, the expert optimizer and its grad norm).
"""

from __future__ import annotations

import torch

from megatron_pathmoe.config import PathMoEConfig


def needs_expert_dp_reduction(cfg: PathMoEConfig) -> bool:
    return cfg.tensor_model_parallel_size > 1 and cfg.expert_model_parallel_size == 1


def reduce_expert_grads_over_expert_dp(models: list[torch.nn.Module], cfg: PathMoEConfig) -> None:
    """Before DDP wrapping: mark expert parameters for the expert data-parallel reduction when
    TP > 1 and EP = 1 (a no-op otherwise, where megatron already does it)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    if not needs_expert_dp_reduction(cfg):
        return
    for model in models:
        for module in model.modules():
            if isinstance(module, MoELayer):
                for param in module.experts.parameters():
                    param.allreduce = False
