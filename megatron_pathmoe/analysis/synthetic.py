"""Synthetic routing recordings with a known structure (benchmarks, tests, demos).

Each token draws its top-k experts at the first layer; at every later layer it keeps its
previous set with probability ``stay`` (``stay_in_block`` inside a block of ``block_size``
layers, ``stay`` across block boundaries) and draws a fresh set otherwise. Fresh sets are drawn
without replacement from a skewed expert popularity (Gumbel top-k over Zipf-like logits scaled
by ``skew``; 0 = uniform). Every layer then relabels its experts with its own random
permutation, as an independently trained router would, so that only an alignment recovers the
kept decisions. No router probabilities are synthesised.
"""

from __future__ import annotations

import numpy as np

from megatron_pathmoe.analysis.path_arrays import ExpertPaths

_TABLE_ROWS = 1 << 14


def _set_table(rng: np.random.Generator, num_experts: int, topk: int,
               skew: float) -> np.ndarray:
    """uint8 [rows, k]: random top-k sets (rank order) under the popularity model."""
    logits = -skew * np.log(np.arange(1, num_experts + 1))
    gumbel = rng.gumbel(size=(_TABLE_ROWS, num_experts)) + logits
    return np.argsort(-gumbel, axis=1)[:, :topk].astype(np.uint8)


def synthetic_paths(num_tokens: int, num_layers: int = 24, num_experts: int = 16,
                    topk: int = 4, stay: float = 0.5, stay_in_block: float | None = None,
                    block_size: int = 1, skew: float = 0.5, relabel: bool = True,
                    seed: int = 0) -> ExpertPaths:
    """An in-memory recording; see the module docstring. Token ids and positions are random."""
    rng = np.random.default_rng(seed)
    table = _set_table(rng, num_experts, topk, skew)
    experts = np.empty((num_layers, topk, num_tokens), np.uint8)
    experts[0] = table[rng.integers(0, _TABLE_ROWS, num_tokens)].T
    for l in range(1, num_layers):
        p = stay if l % block_size == 0 or stay_in_block is None else stay_in_block
        keep = rng.random(num_tokens) < p
        fresh = table[rng.integers(0, _TABLE_ROWS, num_tokens)].T
        experts[l] = np.where(keep, experts[l - 1], fresh)
    if relabel:
        for l in range(num_layers):
            experts[l] = rng.permutation(num_experts).astype(np.uint8)[experts[l]]
    return ExpertPaths(experts=experts, probs=None,
                       tokens=rng.integers(0, 4096, num_tokens, dtype=np.int32),
                       positions=(np.arange(num_tokens) % 256).astype(np.int32),
                       num_experts=num_experts, layer_numbers=tuple(range(1, num_layers + 1)),
                       info={"synthetic": {"stay": stay, "stay_in_block": stay_in_block,
                                           "block_size": block_size, "skew": skew,
                                           "seed": seed}})
