"""Autograd Functions over the compiled kernels.

``PermuteRows``:   out[j] = tokens[idx[j]];  grad_tokens[t] = sum of grad_out over t's rows.
``UnpermuteRows``: out[t] = sum over t's rows j of rows[j] (* weights[j]);
                   grad_rows[j] = grad_out[idx[j]] (* weights[j]),
                   grad_weights[j] = <grad_out[idx[j]], rows[j]>.
Row sums run in ascending row order in fp32 (fp64 for fp64): deterministic, no atomics.
"""

from __future__ import annotations

import torch

from megatron_pathmoe.ops import _kernels


class PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens: torch.Tensor, sorted_indices: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(sorted_indices)
        ctx.num_tokens = tokens.shape[0]
        return _kernels.gather_rows(tokens, sorted_indices)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (sorted_indices,) = ctx.saved_tensors
        offsets, slots = _kernels.token_csr(sorted_indices, ctx.num_tokens)
        return _kernels.segment_sum_rows(grad_out, offsets, slots), None


class UnpermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, weights: torch.Tensor | None,
                sorted_indices: torch.Tensor, num_tokens: int) -> torch.Tensor:
        offsets, slots = _kernels.token_csr(sorted_indices, num_tokens)
        weights_need_grad = weights is not None and ctx.needs_input_grad[1]
        ctx.save_for_backward(sorted_indices, weights, rows if weights_need_grad else None)
        return _kernels.segment_sum_rows(rows, offsets, slots, weights)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        sorted_indices, weights, rows = ctx.saved_tensors
        if rows is None:
            grad_rows = _kernels.gather_rows(grad_out, sorted_indices, weights)
            return grad_rows, None, None, None
        grad_rows, grad_weights = _kernels.gather_rows_and_dot(
            grad_out, sorted_indices, weights, rows, need_rows=ctx.needs_input_grad[0])
        return grad_rows, grad_weights.to(weights.dtype), None, None
