"""Expert load per layer and load-balance statistics (paper sections 3.1 and 4.3).

The load of an expert is the number of top-k selections it receives (what megatron's token
dispatcher sends it), as a fraction of all selections at its layer; uniform load is 1/E. Per
layer, and summarised over layers:

- ``max_violation``: ``max_e load_e * E - 1`` (MaxVio: 0 when perfectly balanced, E-1 when one
  expert takes everything);
- ``min_ratio``: ``min_e load_e * E`` (0 when an expert is never used);
- ``cv``: coefficient of variation of the per-expert loads;
- ``normalized_entropy``: entropy of the load distribution divided by log2 E (1 = uniform);
- ``unused_experts``: experts that received no token.
"""

from __future__ import annotations

import numpy as np

from megatron_pathmoe.analysis.counting import histogram


def expert_load(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """float64 [L, E]: fraction of each layer's top-k selections taken by each expert."""
    counts = np.stack([histogram(layer, num_experts) for layer in experts]).astype(np.float64)
    return counts / np.maximum(counts.sum(1, keepdims=True), 1)


def balance_statistics(load: np.ndarray) -> dict:
    """Per-layer lists and the mean/worst over layers of the statistics in the docstring."""
    E = load.shape[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(load > 0, load * np.log2(load), 0.0)
    per_layer = {
        "max_violation": (load.max(1) * E - 1).tolist(),
        "min_ratio": (load.min(1) * E).tolist(),
        "cv": (load.std(1) / load.mean(1)).tolist(),
        "normalized_entropy": (-plogp.sum(1) / np.log2(E)).tolist() if E > 1 else [1.0] * len(load),
        "unused_experts": (load == 0).sum(1).tolist(),
    }
    return {"per_layer": per_layer,
            "mean_max_violation": float(np.mean(per_layer["max_violation"])),
            "worst_max_violation": float(np.max(per_layer["max_violation"])),
            "mean_cv": float(np.mean(per_layer["cv"])),
            "mean_normalized_entropy": float(np.mean(per_layer["normalized_entropy"])),
            "unused_experts": int(np.sum(per_layer["unused_experts"]))}
