"""What the training log reports beyond the loss: per-layer expert load, routing entropy and
aux losses."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
    reduce_aux_losses_tracker_across_ranks,
)
from megatron.core.transformer.moe.router import Router


class ExpertLoadTracker:
    """Per MoE layer, over training forwards: tokens routed to each expert, and the mean
    per-token entropy of the router's distribution over all experts.

    Forward hooks on every megatron ``Router`` read the routing map it returns (any routing
    variant) and the ``last_routing_entropy`` statistics that this project's routers record.
    """

    def __init__(self, model_chunks: list[torch.nn.Module], num_layers: int,
                 num_experts: int) -> None:
        self.num_experts = num_experts
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.entropy = torch.zeros(num_layers, 2, dtype=torch.float64)  # [sum nats, tokens]
        self._handles = [
            module.register_forward_hook(self._hook)
            for chunk in model_chunks for module in chunk.modules() if isinstance(module, Router)
        ]

    def _hook(self, router: Router, inputs, output) -> None:
        if not router.training or router.layer_number is None:
            return
        _, routing_map = output
        row = router.layer_number - 1
        if self.counts.device != routing_map.device:  # accumulate where routing runs: no sync
            self.counts = self.counts.to(routing_map.device)
            self.entropy = self.entropy.to(routing_map.device)
        self.counts[row] += routing_map.detach().sum(0).to(torch.float64)
        stats = getattr(router, "last_routing_entropy", None)
        if stats is not None:
            self.entropy[row] += stats.detach().to(self.entropy.device, torch.float64)
            router.last_routing_entropy = None

    def pop_load(self) -> torch.Tensor:
        """Per-layer load relative to uniform (1.0 = balanced), summed over all ranks, then
        reset. Rows are ratios, so tokens duplicated across TP ranks cancel out."""
        counts = all_reduce_to_cpu(self.counts)
        self.counts.zero_()
        totals = counts.sum(dim=1, keepdim=True).clamp_min(1)
        return counts * counts.shape[1] / totals

    def pop_entropy(self) -> torch.Tensor:
        """Per-layer mean per-token routing entropy in nats (ln(num_experts) = uniform, 0 =
        one expert takes all the probability), over all ranks since the last call; then
        reset. NaN for a layer whose router records none."""
        entropy = all_reduce_to_cpu(self.entropy)
        self.entropy.zero_()
        return torch.where(entropy[:, 1] > 0, entropy[:, 0] / entropy[:, 1].clamp_min(1),
                           torch.full_like(entropy[:, 0], float("nan")))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def all_reduce_to_cpu(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM
                      ) -> torch.Tensor:
    """A copy of ``tensor`` reduced over all ranks (on the backend's device), on the CPU."""
    reduced = tensor.clone()
    if dist.is_initialized():
        device = (torch.device("cuda", torch.cuda.current_device())
                  if dist.get_backend() == "nccl" else torch.device("cpu"))
        reduced = reduced.to(device)
        dist.all_reduce(reduced, op=op)
    return reduced.cpu()


def peak_memory_gib(device: str) -> float:
    """The largest peak memory of any rank, in GiB: the CUDA caching allocator's high-water
    mark of allocated tensors on GPU (what must fit), the process's peak resident set on
    CPU. Collective: call on every rank."""
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    reduced = all_reduce_to_cpu(torch.tensor([float(peak)], dtype=torch.float64),
                                op=dist.ReduceOp.MAX)
    return float(reduced[0]) / 2**30


def pop_aux_losses(num_moe_layers: int, num_microbatches: int) -> dict[str, float]:
    """Per-iteration mean of each aux loss megatron's routers recorded, over the layers that
    compute it (MonoB{B} computes its losses once per block) and micro-batches, reduced
    across ranks; then clears megatron's tracker. Call once per iteration on every rank (it
    runs collectives)."""
    tracker = get_moe_layer_wise_logging_tracker()
    if not tracker:
        return {}
    reduce_aux_losses_tracker_across_ranks()
    losses = {}
    for name, entry in tracker.items():
        values = entry["values"]
        layers = min(int((values != 0).sum()), num_moe_layers) or num_moe_layers
        losses[name] = float(values.sum()) / (layers * num_microbatches)
    clear_aux_losses_tracker()
    return losses


def format_load(load: torch.Tensor) -> str:
    """'L1 1.42/0.61 L2 ...': max/min load per layer relative to uniform."""
    return " ".join(f"L{i + 1} {row.max():.2f}/{row.min():.2f}" for i, row in enumerate(load))


def format_entropy(entropy: torch.Tensor, num_experts: int) -> str:
    """'L1 0.97 L2 ...': routing entropy per layer as a fraction of the maximum ln(E) (1 =
    uniform router, towards 0 = collapsed onto one expert per token)."""
    top = math.log(num_experts) if num_experts > 1 else 1.0
    return " ".join(f"L{i + 1} {value / top:.2f}" for i, value in enumerate(entropy.tolist()))
