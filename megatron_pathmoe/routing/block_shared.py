"""PathMoE (PathB{B}-MoE): one router per block of B consecutive MoE layers.

Every MoE layer keeps its own ``BlockSharedRouter`` module (its own layer number, aux-loss
tracking and routing computation), but only the first layer of a block on this pipeline stage
owns the ``weight`` Parameter; the other layers of the block hold a plain reference to it. So
``parameters()`` and ``state_dict()`` see one tensor and one entry per block, DDP and the
optimizer keep one copy of its state, and autograd sums the per-layer gradients into it. The
shared weight carries ``pathmoe_tie = "path.block{b}.weight"`` (b is the 0-based block).

Aux-loss-free balancing (``--moe-router-enable-expert-bias``) follows the same rule: the block
shares one routing function, so it shares one ``expert_bias`` and one token counter. Every
layer of the block adds the tokens it routes to the block's counter; after each global batch
megatron's ``finalize_model_grads`` moves the block's bias once, by the sign of (block mean
load - block load per expert), summed over all layers of the block and all ranks. Each layer
keeps the buffers registered (same tensor as the block owner's), so checkpoints hold the
block's bias in every layer's slot.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_pathmoe.routing.base import PathMoERouter


def block_index(layer_number: int, block_size: int) -> int:
    """0-based block of a 1-based (global, megatron-style) layer number."""
    if layer_number < 1:
        raise ValueError(f"layer numbers are 1-based, got {layer_number}")
    return (layer_number - 1) // block_size


def block_layers(index: int, block_size: int) -> tuple[int, ...]:
    """The 1-based layer numbers of 0-based block ``index``."""
    return tuple(range(index * block_size + 1, (index + 1) * block_size + 1))


def num_blocks(num_layers: int, block_size: int) -> int:
    if num_layers % block_size:
        raise ValueError(f"block size {block_size} does not divide {num_layers} layers")
    return num_layers // block_size


_EXPERT_BIAS_BUFFERS = ("expert_bias", "local_tokens_per_expert")


class BlockSharedRouter(PathMoERouter):
    """A ``TopKRouter`` whose parameters are shared with the other layers of its block."""

    variant = "path"
    tied_parameter_names: tuple[str, ...] = ("weight",)
    shares_expert_bias = True

    def __init__(self, config: Any, pg_collection: Any = None, *, build: Any) -> None:
        super().__init__(config, pg_collection, build=build)
        self.block_size = self.routing_block_size()
        self.block_index: int | None = None
        self.is_block_owner = True
        self.block_owner_layer: int | None = None

    def routing_block_size(self) -> int:
        return self.pathmoe_config.block_size

    def tie_key(self, name: str) -> str:
        return f"{self.variant}.block{self.block_index}.{name}"

    def tie_parameters(self) -> None:
        self.block_index = block_index(self.layer_number, self.block_size)
        self.block_owner_layer = self.layer_number
        if self.block_size == 1:
            return  # nothing shared: checkpoints keep megatron's per-layer keys
        layers = block_layers(self.block_index, self.block_size)
        ties = self._build.ties
        owned = [ties.tie(self, name, self.tie_key(name), layers)
                 for name in self.tied_parameter_names]
        self.is_block_owner = owned[0]
        self.block_owner_layer = self.block_owner().layer_number
        self.share_expert_bias()

    def block_owner(self) -> "BlockSharedRouter":
        if self.block_size == 1:
            return self
        return self._build.ties.owner(self.tie_key(self.tied_parameter_names[0]))

    def share_expert_bias(self) -> None:
        """Point this layer's expert-bias buffers at the block owner's. Redone every forward:
        module-wide dtype/device conversions replace buffers per module."""
        if self.is_block_owner or not self.shares_expert_bias or not self.enable_expert_bias:
            return
        owner = self.block_owner()
        for name in _EXPERT_BIAS_BUFFERS:
            self._buffers[name] = owner._buffers[name]

    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None):
        self.share_expert_bias()
        return super().forward(input, padding_mask=padding_mask)


def shared_router_weights(model: torch.nn.Module) -> dict[int, torch.nn.Parameter]:
    """Block index -> the block's weight, for the block-shared routers in ``model``."""
    return {m.block_index: m.weight for m in model.modules()
            if isinstance(m, BlockSharedRouter) and m.is_block_owner and m.weight is not None}
