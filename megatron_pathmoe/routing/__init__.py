"""Routing variants, selectable by name (``--routing``)."""

from __future__ import annotations

from typing import Callable

from megatron_pathmoe.config import ROUTING_CHOICES, PathMoEConfig
from megatron_pathmoe.routing.block_shared import (
    BlockSharedRouter,
    BlockSharedRouterBuilder,
    block_index,
    num_blocks,
    shared_router_weights,
)


def _independent(config: PathMoEConfig) -> Callable:
    from megatron.core.transformer.moe.router import TopKRouter

    return TopKRouter


def _path(config: PathMoEConfig) -> Callable:
    return BlockSharedRouterBuilder(config.path_block_size)


ROUTER_BUILDERS: dict[str, Callable[[PathMoEConfig], Callable]] = {
    "independent": _independent,
    "path": _path,
}
# config.ROUTING_CHOICES names the variants (validated before megatron is imported); this
# table maps each name to its builder.
assert set(ROUTER_BUILDERS) == set(ROUTING_CHOICES), "routing registry out of sync with config"


def build_router_builder(config: PathMoEConfig) -> Callable:
    """The ``MoESubmodules.router`` builder for ``config.routing`` (fresh per model build)."""
    try:
        return ROUTER_BUILDERS[config.routing](config)
    except KeyError:
        raise ValueError(f"--routing {config.routing!r} is unknown; choose one of "
                         f"{', '.join(ROUTER_BUILDERS)}") from None


__all__ = [
    "BlockSharedRouter",
    "BlockSharedRouterBuilder",
    "ROUTER_BUILDERS",
    "block_index",
    "build_router_builder",
    "num_blocks",
    "shared_router_weights",
]
