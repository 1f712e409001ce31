"""PathMoE's own signals as named scalars: per MoE layer (and per router block, for routers
shared by blocks of layers) the expert load relative to uniform and the routing entropy."""

from __future__ import annotations

import math

import torch


def expert_load_scalars(load: torch.Tensor, entropy: torch.Tensor | None = None,
                        block_size: int = 1) -> dict[str, float]:
    """``load`` [layers, experts]: tokens per expert relative to uniform (1.0 = balanced, as
    ``ExpertLoadTracker.pop_load`` returns); ``entropy`` [layers]: mean routing entropy in
    nats. Returns, per layer i (1-based), ``moe/expert_load_{max,min,cv}_layer_i`` and
    ``moe/routing_entropy_layer_i`` (a fraction of ln(experts): 1 = uniform router); with
    ``block_size`` > 1 the same per block b as ``..._block_b`` (layers of a block pooled)."""
    scalars = _series(load, entropy, "layer")
    if block_size > 1:
        blocks = load.shape[0] // block_size
        pooled = load[:blocks * block_size].reshape(blocks, block_size, -1).mean(1)
        pooled_entropy = None
        if entropy is not None:
            pooled_entropy = entropy[:blocks * block_size].reshape(blocks, block_size).nanmean(1)
        scalars.update(_series(pooled, pooled_entropy, "block"))
    return scalars


def _series(load: torch.Tensor, entropy: torch.Tensor | None, unit: str) -> dict[str, float]:
    load = load.double()
    top = math.log(load.shape[1]) if load.shape[1] > 1 else 1.0
    scalars: dict[str, float] = {}
    for i, row in enumerate(load, start=1):
        scalars[f"moe/expert_load_max_{unit}_{i}"] = float(row.max())
        scalars[f"moe/expert_load_min_{unit}_{i}"] = float(row.min())
        scalars[f"moe/expert_load_cv_{unit}_{i}"] = load_cv(row)
        if entropy is not None:
            scalars[f"moe/routing_entropy_{unit}_{i}"] = float(entropy[i - 1]) / top
    return scalars


def load_cv(row: torch.Tensor) -> float:
    """Coefficient of variation of one layer's expert load (0 = perfectly balanced)."""
    mean = float(row.mean())
    return float(row.std(unbiased=False)) / mean if mean > 0 else float("nan")
