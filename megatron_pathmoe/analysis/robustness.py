"""Routing robustness (paper section 7.2): perplexity when expert indices are permuted.

For a permutation probability p, every MoE layer is, independently with probability p, given a
random permutation ``perm`` of its experts: the token its router sends to expert i with
probability q goes to expert ``perm[i]`` with probability q. A forward hook on each megatron
``Router`` applies it to both outputs (``probs`` and ``routing_map``), so it works for every
routing variant. The choice of layer and permutation depends only on (seed, layer number), so
every tensor-/pipeline-parallel rank makes the same choice for a layer. At p = 0 no hook is
installed and the forward is the unperturbed one; the sweep reports the mean perplexity over
seeds and its degradation relative to p = 0.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from megatron_pathmoe.routing import RouterHooks, routers_of

DEFAULT_P = (0.0, 0.25, 0.5, 0.75, 1.0)


def layer_permutation(layer_number: int, probability: float, seed: int,
                      num_experts: int) -> np.ndarray | None:
    """The permutation of a layer's experts for (seed, layer), or None (left alone)."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"permutation probability must be in [0, 1], got {probability}")
    rng = np.random.default_rng([seed, layer_number])
    if rng.random() >= probability:
        return None
    return rng.permutation(num_experts)


class ExpertPermutation(RouterHooks):
    """Context manager: routers' expert indices permuted as in the module docstring."""

    def __init__(self, model_chunks: list[torch.nn.Module], probability: float,
                 seed: int) -> None:
        super().__init__()
        self.permutations: dict[int, np.ndarray] = {}
        for router in routers_of(model_chunks):
            perm = layer_permutation(router.layer_number, probability, seed,
                                     router.config.num_moe_experts)
            if perm is None:
                continue
            self.permutations[router.layer_number] = perm
            inverse = torch.from_numpy(np.argsort(perm))
            self.hook_forward([router], self._hook_for(inverse))

    @staticmethod
    def _hook_for(inverse: torch.Tensor) -> Callable:
        def hook(router, inputs, output):
            probs, routing_map = output
            index = inverse.to(probs.device)
            # New column perm[i] takes old column i: new[:, j] = old[:, inverse[j]].
            return probs[:, index], routing_map[:, index]
        return hook


def robustness_sweep(evaluate: Callable[[], float], model_chunks: list[torch.nn.Module],
                     probabilities: list[float], seeds: int,
                     on_step: Callable[[], None] | None = None) -> dict:
    """Perplexity at each permutation probability (mean over ``seeds`` seeds, each seed's in
    ``draw_perplexities``: a few permutations can cost far more than the rest; one run at
    p = 0, which has nothing random) and its degradation in percent relative to p = 0.
    ``evaluate()`` returns the mean loss in nats of the model as currently hooked."""
    rows = []
    for p in sorted(set([0.0, *probabilities])):
        losses = []
        for seed in range(1 if p == 0.0 else seeds):
            with ExpertPermutation(model_chunks, p, seed):
                losses.append(evaluate())
            if on_step is not None:
                on_step()
        perplexities = [math.exp(x) for x in losses]
        rows.append({"p": p, "perplexity": float(np.mean(perplexities)),
                     "perplexity_std": float(np.std(perplexities)), "seeds": len(losses),
                     "draw_perplexities": perplexities})
    base = rows[0]["perplexity"]
    for row in rows:
        row["degradation_percent"] = 100.0 * (row["perplexity"] / base - 1.0)
    return {"base_perplexity": base, "sweep": rows}
