"""Rand-MoE: randomly initialised routers that stay frozen (the paper's lower bound on learned
routing). The module is not called ``random`` so that it never shadows the standard library's.

The weight is drawn like megatron's router weight (``init_method``, from the seeded default
generator) and then frozen with ``requires_grad=False``: megatron DDP allocates no gradient
buffer for it, ``get_megatron_optimizer`` leaves it out of every parameter group, and it is
still an ordinary Parameter, so ``state_dict()`` and dist checkpoints save and load it.
Gradients still flow through the routing probabilities into the hidden states.
"""

from __future__ import annotations

from megatron_pathmoe.routing.base import PathMoERouter


class RandomRouter(PathMoERouter):
    variant = "random"

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.weight.requires_grad_(False)
