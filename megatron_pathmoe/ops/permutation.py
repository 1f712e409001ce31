"""Drop-in ``permute``/``unpermute`` for megatron-core's token dispatchers, on the compiled
kernels. Signatures, outputs and semantics are those of megatron-core 0.16.1's unfused
``moe_utils.permute``/``unpermute`` (dropless and drop-and-pad); ``fused=True`` still goes to
megatron-core (transformer-engine's fused kernels).

Differences, all on the side of accuracy: weighted sums accumulate in fp32 for bf16/fp16 rows
and round once (megatron-core adds bf16 products in bf16 when probs are bf16); results are
deterministic on every device (megatron-core's CUDA ``scatter_add_`` is not).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron_pathmoe.ops import _kernels
from megatron_pathmoe.ops.functions import PermuteRows, UnpermuteRows


def check_routing_args(tokens: torch.Tensor, routing_map: torch.Tensor,
                       probs: Optional[torch.Tensor]) -> None:
    """Shapes that permute() needs, with an error that says which argument is wrong."""
    if tokens.dim() != 2:
        raise ValueError(f"permute: tokens must be [num_tokens, hidden], got {tuple(tokens.shape)}")
    check_dtype("permute: tokens", tokens)
    if routing_map.dim() != 2 or routing_map.shape[0] != tokens.shape[0]:
        raise ValueError(f"permute: routing_map must be [num_tokens={tokens.shape[0]}, "
                         f"num_experts], got {tuple(routing_map.shape)}")
    if routing_map.shape[1] == 0:
        raise ValueError("permute: routing_map has no experts")
    if probs is not None and probs.shape != routing_map.shape:
        raise ValueError(f"permute: probs must have the routing map's shape "
                         f"{tuple(routing_map.shape)}, got {tuple(probs.shape)}")


def check_dtype(what: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in _kernels.SUPPORTED_DTYPES:
        supported = ", ".join(str(d).replace("torch.", "") for d in _kernels.SUPPORTED_DTYPES)
        raise TypeError(f"{what} have dtype {tensor.dtype}; supported: {supported}")


def drop_and_pad_capacity(num_out_tokens: int | torch.Tensor, num_experts: int,
                          num_tokens: int) -> int:
    """megatron-core's capacity in drop-and-pad mode: num_out_tokens // num_experts."""
    capacity = int(num_out_tokens) // num_experts
    if capacity > num_tokens:
        raise ValueError(
            f"permute(drop_and_pad=True): capacity {capacity} (num_out_tokens {int(num_out_tokens)}"
            f" // {num_experts} experts) exceeds the {num_tokens} tokens, so experts cannot be "
            "padded to it; lower --moe-expert-capacity-factor")
    return capacity


def expert_of_rows(routing_map: torch.Tensor, num_rows: int, drop_and_pad: bool) -> torch.Tensor:
    """Expert of every permuted row (rows are grouped by expert, experts ascending)."""
    num_experts = routing_map.shape[1]
    experts = torch.arange(num_experts, device=routing_map.device)
    if drop_and_pad:
        if num_rows % num_experts:
            raise ValueError(f"unpermute(drop_and_pad=True): {num_rows} permuted rows do not "
                             f"split into {num_experts} experts of equal capacity")
        return experts.repeat_interleave(num_rows // num_experts)
    expert_ids = experts.repeat_interleave(routing_map.sum(dim=0))
    if expert_ids.numel() != num_rows:
        raise ValueError(f"unpermute: routing_map routes {expert_ids.numel()} rows but "
                         f"sorted_indices has {num_rows}; pass the map given to permute()")
    return expert_ids


def gather_probs(probs: torch.Tensor, sorted_indices: torch.Tensor,
                 expert_ids: torch.Tensor) -> torch.Tensor:
    """probs[sorted_indices[j], expert_ids[j]] for every permuted row j (differentiable)."""
    flat_index = sorted_indices * probs.shape[1] + expert_ids
    return probs.reshape(-1).index_select(0, flat_index)


def permute(
    tokens: torch.Tensor,
    routing_map: torch.Tensor,
    probs: Optional[torch.Tensor] = None,
    num_out_tokens: Optional[int] = None,
    fused: bool = False,
    drop_and_pad: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Group tokens by expert: (permuted tokens, permuted probs or None, sorted_indices)."""
    if fused:
        from megatron.core.transformer.moe import moe_utils

        return moe_utils.permute(tokens, routing_map, probs, num_out_tokens, fused, drop_and_pad)
    check_routing_args(tokens, routing_map, probs)
    num_tokens, num_experts = routing_map.shape
    padded = drop_and_pad and num_out_tokens is not None
    with torch.no_grad():
        if padded:
            capacity = drop_and_pad_capacity(num_out_tokens, num_experts, num_tokens)
            num_rows = capacity * num_experts
        else:
            capacity, num_rows = None, int(routing_map.sum())
        sorted_indices = _kernels.routing_map_to_indices(routing_map, num_rows, capacity)
    permuted_tokens = PermuteRows.apply(tokens, sorted_indices)
    permuted_probs = None
    if probs is not None:
        expert_ids = expert_of_rows(routing_map, num_rows, padded)
        permuted_probs = gather_probs(probs, sorted_indices, expert_ids)
    return permuted_tokens, permuted_probs, sorted_indices


def unpermute(
    permuted_tokens: torch.Tensor,
    sorted_indices: torch.Tensor,
    restore_shape: torch.Size,
    probs: Optional[torch.Tensor] = None,
    routing_map: Optional[torch.Tensor] = None,
    fused: bool = False,
    drop_and_pad: bool = False,
) -> torch.Tensor:
    """Sum every token's permuted rows (weighted by its probs) back into [num_tokens, hidden]."""
    if fused:
        from megatron.core.transformer.moe import moe_utils

        return moe_utils.unpermute(permuted_tokens, sorted_indices, restore_shape, probs,
                                   routing_map, fused, drop_and_pad)
    num_tokens, hidden = restore_shape
    if permuted_tokens.dim() != 2 or permuted_tokens.shape != (sorted_indices.numel(), hidden):
        raise ValueError(f"unpermute: permuted_tokens must be [{sorted_indices.numel()}, {hidden}]"
                         f" (sorted_indices, restore_shape), got {tuple(permuted_tokens.shape)}")
    check_dtype("unpermute: permuted_tokens", permuted_tokens)
    weights = None
    if probs is not None:
        assert routing_map is not None, "Mask must be provided to permute the probs."
        expert_ids = expert_of_rows(routing_map, sorted_indices.numel(), drop_and_pad)
        weights = gather_probs(probs, sorted_indices, expert_ids)
    return UnpermuteRows.apply(permuted_tokens, weights, sorted_indices, num_tokens)
