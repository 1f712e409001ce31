"""Pure-PyTorch reference of the permutation semantics: slow, plain, differentiable by torch.

It is the ground truth of the tests and the ``--permute-impl reference`` choice. Same signatures
as megatron-core 0.16.1's unfused ``moe_utils.permute``/``unpermute``; sums accumulate in fp32
(fp64 for fp64) like the compiled kernels.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron_pathmoe.ops._kernels import accumulation_dtype
from megatron_pathmoe.ops.permutation import check_routing_args, drop_and_pad_capacity


def expert_rows(routing_map: torch.Tensor,
                capacity: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sorted_indices, expert of each row), built expert by expert.

    Dropless: each expert's routed tokens in ascending order. With a capacity: its first
    ``capacity`` routed tokens, padded with its first non-routed tokens.
    """
    routed = routing_map.bool()
    indices, experts = [], []
    for expert in range(routed.shape[1]):
        chosen = torch.nonzero(routed[:, expert]).flatten()
        if capacity is not None:
            padding = torch.nonzero(~routed[:, expert]).flatten()
            chosen = torch.cat([chosen, padding])[:capacity]
        indices.append(chosen)
        experts.append(torch.full_like(chosen, expert))
    return torch.cat(indices), torch.cat(experts)


def permute(
    tokens: torch.Tensor,
    routing_map: torch.Tensor,
    probs: Optional[torch.Tensor] = None,
    num_out_tokens: Optional[int] = None,
    fused: bool = False,
    drop_and_pad: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    check_routing_args(tokens, routing_map, probs)
    capacity = None
    if drop_and_pad and num_out_tokens is not None:
        num_tokens, num_experts = routing_map.shape
        capacity = drop_and_pad_capacity(num_out_tokens, num_experts, num_tokens)
    sorted_indices, experts = expert_rows(routing_map, capacity)
    permuted_probs = None if probs is None else probs[sorted_indices, experts]
    # Gathering in the accumulation type makes autograd sum the gradient in it, too.
    permuted = tokens.to(accumulation_dtype(tokens.dtype))[sorted_indices].to(tokens.dtype)
    return permuted, permuted_probs, sorted_indices


def unpermute(
    permuted_tokens: torch.Tensor,
    sorted_indices: torch.Tensor,
    restore_shape: torch.Size,
    probs: Optional[torch.Tensor] = None,
    routing_map: Optional[torch.Tensor] = None,
    fused: bool = False,
    drop_and_pad: bool = False,
) -> torch.Tensor:
    acc_dtype = accumulation_dtype(permuted_tokens.dtype)
    rows = permuted_tokens.to(acc_dtype)
    if probs is not None:
        assert routing_map is not None, "Mask must be provided to permute the probs."
        num_experts = routing_map.shape[1]
        capacity = sorted_indices.numel() // num_experts if drop_and_pad else None
        _, experts = expert_rows(routing_map, capacity)
        rows = rows * probs[sorted_indices, experts].to(acc_dtype).unsqueeze(-1)
    out = torch.zeros(restore_shape, dtype=acc_dtype, device=permuted_tokens.device)
    return out.index_add(0, sorted_indices, rows).to(permuted_tokens.dtype)
