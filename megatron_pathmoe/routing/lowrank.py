"""LowRank-MoE: a base router shared by all layers plus a per-layer low-rank correction.

``logits_l = x @ (W_base + A_l @ B_l).T`` with ``W_base`` [experts, hidden] shared by every
layer (``pathmoe_tie = "lowrank.base"``), ``A_l`` [experts, r] and ``B_l`` [r, hidden] owned by
layer l. ``A_l`` starts at zero, so training starts from the shared router (as in LoRA);
``--lowrank-rank 0`` has no correction and is exactly PathMoE with one block. The correction is
computed as ``(x @ B_l.T) @ A_l.T`` (r*(hidden+experts) flops per token, not experts*hidden).

The routing functions differ per layer, so unlike PathMoE each layer keeps its own expert bias.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from megatron_pathmoe.routing.block_shared import BlockSharedRouter


class LowRankRouter(BlockSharedRouter):
    variant = "lowrank"
    shares_expert_bias = False

    def __init__(self, config: Any, pg_collection: Any = None, *, build: Any) -> None:
        super().__init__(config, pg_collection, build=build)
        self.rank = self.pathmoe_config.lowrank_rank
        if self.rank:
            experts, hidden = self.config.num_moe_experts, self.config.hidden_size
            self.lowrank_a = self.new_parameter(torch.zeros(experts, self.rank))
            lowrank_b = torch.empty(self.rank, hidden)
            self.config.init_method(lowrank_b)
            self.lowrank_b = self.new_parameter(lowrank_b)

    def routing_block_size(self) -> int:
        return self.pathmoe_config.num_layers

    def tie_key(self, name: str) -> str:
        return "lowrank.base"

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        logits = super().gating(input)
        if not self.rank:
            return logits
        low = F.linear(self.to_router_dtype(input), self.to_router_dtype(self.lowrank_b))
        return logits + F.linear(low, self.to_router_dtype(self.lowrank_a))

    def export_gate_weight(self) -> torch.Tensor:
        weight = super().export_gate_weight()
        if self.rank:
            weight += self.lowrank_a.detach().float() @ self.lowrank_b.detach().float()
        return weight
