"""Routing variants, selectable by name (``--routing``); see each module's docstring.

=============  ====================  ====================================================
``--routing``  paper name            router
=============  ====================  ====================================================
independent    Indep-MoE             :class:`IndependentRouter` (megatron ``TopKRouter``)
path           PathB{B}-MoE/PathMoE  :class:`BlockSharedRouter`
random         Rand-MoE              :class:`RandomRouter` (frozen)
xmoe           X-MoE / PathB{B}X-MoE :class:`XMoERouter`
recurrent      Recurrent-MoE         :class:`RecurrentRouter`
mono           MonoB{B}-MoE          :class:`MonoRouter`
lowrank        LowRank-MoE           :class:`LowRankRouter`
=============  ====================  ====================================================

``hooks`` is how the layers above reach routers (``routers_of``, the ``RouterHooks`` base);
the allowed-paths file of path restriction is read by ``megatron_pathmoe.expert_paths``.
"""

from __future__ import annotations

from megatron_pathmoe.config import ROUTING_CHOICES, PathMoEConfig
from megatron_pathmoe.routing.base import (
    DepthCarry,
    PathMoERouter,
    RouterBuilder,
    RoutingExportError,
    TieRegistry,
    tied_router_parameters,
)
from megatron_pathmoe.routing.block_shared import (
    BlockSharedRouter,
    block_index,
    block_layers,
    num_blocks,
    shared_router_weights,
)
from megatron_pathmoe.routing.hooks import RouterHooks, routers_of, unwrap_model
from megatron_pathmoe.routing.independent import IndependentRouter
from megatron_pathmoe.routing.lowrank import LowRankRouter
from megatron_pathmoe.routing.mono import MonoRouter
from megatron_pathmoe.routing.frozen_random import RandomRouter
from megatron_pathmoe.routing.recurrent import RecurrentRouter
from megatron_pathmoe.routing.xmoe import XMoERouter

ROUTER_CLASSES: dict[str, type[PathMoERouter]] = {
    "independent": IndependentRouter,
    "path": BlockSharedRouter,
    "random": RandomRouter,
    "xmoe": XMoERouter,
    "recurrent": RecurrentRouter,
    "mono": MonoRouter,
    "lowrank": LowRankRouter,
}
# config.ROUTING_CHOICES names the variants (validated before megatron is imported); this
# table maps each name to its router class.
assert set(ROUTER_CLASSES) == set(ROUTING_CHOICES), "routing registry out of sync with config"


def build_router_builder(config: PathMoEConfig) -> RouterBuilder:
    """The ``MoESubmodules.router`` builder for ``config.routing`` (fresh per model build)."""
    try:
        router_class = ROUTER_CLASSES[config.routing]
    except KeyError:
        raise ValueError(f"--routing {config.routing!r} is unknown; choose one of "
                         f"{', '.join(ROUTER_CLASSES)}") from None
    return RouterBuilder(config, router_class)


__all__ = [
    "BlockSharedRouter",
    "DepthCarry",
    "IndependentRouter",
    "LowRankRouter",
    "MonoRouter",
    "PathMoERouter",
    "ROUTER_CLASSES",
    "RandomRouter",
    "RecurrentRouter",
    "RouterBuilder",
    "RouterHooks",
    "RoutingExportError",
    "TieRegistry",
    "XMoERouter",
    "block_index",
    "block_layers",
    "build_router_builder",
    "num_blocks",
    "routers_of",
    "shared_router_weights",
    "tied_router_parameters",
    "unwrap_model",
]
