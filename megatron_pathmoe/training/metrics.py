"""What the training log reports beyond the loss: per-layer expert load and aux losses."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
    reduce_aux_losses_tracker_across_ranks,
)
from megatron.core.transformer.moe.router import Router


class ExpertLoadTracker:
    """Counts tokens routed to each expert of each MoE layer during training forwards.

    Forward hooks on every megatron ``Router`` read the routing map it returns, so this works
    for any routing variant and never touches the routers themselves.
    """

    def __init__(self, model_chunks: list[torch.nn.Module], num_layers: int,
                 num_experts: int) -> None:
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self._handles = [
            module.register_forward_hook(self._hook)
            for chunk in model_chunks for module in chunk.modules() if isinstance(module, Router)
        ]

    def _hook(self, router: Router, inputs, output) -> None:
        if router.training and router.layer_number is not None:
            _, routing_map = output
            self.counts[router.layer_number - 1] += routing_map.detach().sum(0).to(
                device="cpu", dtype=torch.float64)

    def pop_load(self) -> torch.Tensor:
        """Per-layer load relative to uniform (1.0 = balanced), summed over all ranks, then
        reset. Rows are ratios, so tokens duplicated across TP ranks cancel out."""
        counts = self.counts.clone()
        self.counts.zero_()
        if dist.is_initialized():
            dist.all_reduce(counts)
        totals = counts.sum(dim=1, keepdim=True).clamp_min(1)
        return counts * counts.shape[1] / totals

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def pop_aux_losses(num_moe_layers: int, num_microbatches: int) -> dict[str, float]:
    """Per-iteration mean over layers and micro-batches of each aux loss that megatron's
    routers recorded, reduced across ranks; then clears megatron's tracker. Call once per
    iteration on every rank (it runs collectives)."""
    tracker = get_moe_layer_wise_logging_tracker()
    if not tracker:
        return {}
    reduce_aux_losses_tracker_across_ranks()
    losses = {name: float(entry["values"].sum()) / (num_moe_layers * num_microbatches)
              for name, entry in tracker.items()}
    clear_aux_losses_tracker()
    return losses


def format_load(load: torch.Tensor) -> str:
    """'L1 1.42/0.61 L2 ...': max/min load per layer relative to uniform."""
    return " ".join(f"L{i + 1} {row.max():.2f}/{row.min():.2f}" for i, row in enumerate(load))
