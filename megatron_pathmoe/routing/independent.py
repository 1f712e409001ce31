"""Indep-MoE: megatron-core's ``TopKRouter`` in every layer, each with its own weight."""

from __future__ import annotations

from megatron_pathmoe.routing.base import PathMoERouter


class IndependentRouter(PathMoERouter):
    """Megatron's ``TopKRouter`` unchanged, plus the PathMoE router interface (gate export,
    routing-entropy logging, path restriction)."""

    variant = "independent"
