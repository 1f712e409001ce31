"""PathMoE routing: one router weight per block of B consecutive MoE layers.

Every MoE layer keeps its own ``BlockSharedRouter`` module (its own layer number, aux-loss
tracking and routing computation), but only the first layer of a block on this pipeline stage
owns the ``weight`` Parameter; the other layers of the block hold a plain reference to it. So
``parameters()`` and ``state_dict()`` see one tensor and one entry per block, DDP and the
optimizer keep one copy of its state, and autograd sums the per-layer gradients into it.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer.moe.router import TopKRouter


def block_index(layer_number: int, block_size: int) -> int:
    """0-based block of a 1-based (global, megatron-style) layer number."""
    if layer_number < 1:
        raise ValueError(f"layer numbers are 1-based, got {layer_number}")
    return (layer_number - 1) // block_size


def num_blocks(num_layers: int, block_size: int) -> int:
    if num_layers % block_size:
        raise ValueError(f"block size {block_size} does not divide {num_layers} layers")
    return num_layers // block_size


class BlockSharedRouter(TopKRouter):
    """A ``TopKRouter`` whose weight is shared with the other layers of its block."""

    def __init__(self, config: Any, pg_collection: Any = None, *, block_size: int,
                 owners: dict[int, "BlockSharedRouter"]) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        self.block_size = block_size
        self.block_index: int | None = None
        self.is_block_owner = True
        # Shared per model build (see BlockSharedRouterBuilder); not a submodule.
        object.__setattr__(self, "_owners", owners)

    def set_layer_number(self, layer_number: int) -> None:
        """Megatron passes the global layer number after construction; the tie happens here,
        before DDP wrapping or optimizer construction ever see the parameters."""
        super().set_layer_number(layer_number)
        self.block_index = block_index(layer_number, self.block_size)
        owner = self._owners.setdefault(self.block_index, self)
        if owner is not self:
            self._use_weight_of(owner)

    def _use_weight_of(self, owner: "BlockSharedRouter") -> None:
        if self.bias is not None or owner.weight.shape != self.weight.shape:
            raise ValueError("block-shared routers must have identical, bias-free weights")
        del self._parameters["weight"]
        # A plain attribute, not a registered Parameter: one owner per shared tensor.
        object.__setattr__(self, "weight", owner.weight)
        self.is_block_owner = False
        self.block_owner_layer = owner.layer_number


class BlockSharedRouterBuilder:
    """The ``MoESubmodules.router`` builder for PathMoE. One instance per model build, so the
    ties of two models in one process never mix."""

    def __init__(self, block_size: int) -> None:
        if block_size < 1:
            raise ValueError("--path-block-size must be at least 1")
        self.block_size = block_size
        self.owners: dict[int, BlockSharedRouter] = {}

    def __call__(self, *, config: Any, pg_collection: Any = None, **kwargs: Any) -> BlockSharedRouter:
        return BlockSharedRouter(config, pg_collection, block_size=self.block_size,
                                 owners=self.owners)


def shared_router_weights(model: torch.nn.Module) -> dict[int, torch.nn.Parameter]:
    """Block index -> the block's weight, for the block-shared routers in ``model``."""
    return {m.block_index: m.weight for m in model.modules()
            if isinstance(m, BlockSharedRouter) and m.is_block_owner}
