"""Autograd Functions over the compiled kernels.

Both work on the token CSR of sorted_indices (every token's permuted rows, ascending), so each
pass reads every input row once and writes every output row once:

``PermuteRows``:   out[j] = tokens[idx[j]]             (scatter of token rows)
                   grad_tokens[t] = sum of grad_out over t's rows
``UnpermuteRows``: out[t] = sum over t's rows j of rows[j] (* weights[j])
                   grad_rows[j] = grad_out[idx[j]] (* weights[j])   (scatter of token rows)
                   grad_weights[j] = <grad_out[idx[j]], rows[j]>
Row sums run in ascending row order in fp32 (fp64 for fp64): deterministic, no atomics.
"""

from __future__ import annotations

import torch

from megatron_pathmoe.ops import _kernels


class PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens: torch.Tensor, sorted_indices: torch.Tensor) -> torch.Tensor:
        offsets, slots = _kernels.token_csr(sorted_indices, tokens.shape[0])
        ctx.save_for_backward(offsets, slots)
        return _kernels.scatter_rows(tokens, offsets, slots, sorted_indices.numel())

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        offsets, slots = ctx.saved_tensors
        return _kernels.segment_sum_rows(grad_out, offsets, slots), None


class UnpermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, weights: torch.Tensor | None,
                sorted_indices: torch.Tensor, num_tokens: int) -> torch.Tensor:
        offsets, slots = _kernels.token_csr(sorted_indices, num_tokens)
        weights_need_grad = weights is not None and ctx.needs_input_grad[1]
        ctx.save_for_backward(offsets, slots, weights, rows if weights_need_grad else None)
        return _kernels.segment_sum_rows(rows, offsets, slots, weights)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        offsets, slots, weights, rows = ctx.saved_tensors
        if rows is None:
            grad_rows = _kernels.scatter_rows(grad_out, offsets, slots, slots.numel(), weights)
            return grad_rows, None, None, None
        grad_rows, grad_weights = _kernels.scatter_rows_and_dot(
            grad_out, offsets, slots, weights, rows, need_rows=ctx.needs_input_grad[0])
        return grad_rows, grad_weights.to(weights.dtype), None, None
