"""MonoB{B}-MoE: routing *decisions* shared within blocks of B layers.

The first layer of each block routes like a ``TopKRouter`` (with the block's weight,
``pathmoe_tie = "mono.block{b}.weight"``); every other layer of the block returns that layer's
``probs`` and ``routing_map`` unchanged, so a token uses the same experts with the same gate
weights in the whole block. Gradients of every layer's expert mixture flow into the first
layer's router. Aux and z losses are computed once per block (the decisions are made once) and
logged in the first layer's slot; expert bias and token counts are the block's (counted once,
at the deciding layer). The decision never crosses a pipeline stage (config validation).
"""

from __future__ import annotations

import torch

from megatron_pathmoe.routing.block_shared import BlockSharedRouter


class MonoRouter(BlockSharedRouter):
    variant = "mono"

    def decision_key(self) -> str:
        return f"mono.block{self.block_index}.decision"

    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None):
        if self.is_block_owner:
            probs, routing_map = super().forward(input, padding_mask=padding_mask)
            if self.block_size > 1:
                self._build.carry.put(self.decision_key(),
                                      (probs, routing_map, self.last_routing_entropy))
            return probs, routing_map
        self.share_expert_bias()
        last = self.layer_number == (self.block_index + 1) * self.block_size
        probs, routing_map, entropy = self._build.carry.get(
            self.decision_key(), input.shape[0] * input.shape[1],
            f"mono router of layer {self.layer_number}", last_reader=last)
        self.last_routing_entropy = entropy
        return probs, routing_map

    def export_gate_weight(self) -> torch.Tensor:
        raise self.export_error("the layers of a block reuse the first layer's decisions, "
                                "which a per-layer gate cannot express")
