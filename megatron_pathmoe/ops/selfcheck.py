"""The compiled kernels check themselves on the device a run uses before they touch its tokens.

A kernel that never ran on a given GPU, compiler or dtype must not silently corrupt training:
:func:`self_check` runs the custom ``permute``/``unpermute`` on a small random routing (some
experts empty, an odd hidden size) and compares values and gradients with the pure-PyTorch
reference on the same device, in both ways megatron-core applies the routing probabilities
(scaled rows, weighted unpermute). Indices and permuted rows must be identical; sums within
the tolerances below (a few roundings: the reference's ``index_add`` is ordered differently,
on CUDA by atomics). The whole check costs a few milliseconds (see tests/ops/test_selfcheck.py).

The routing helpers here are also the test suite's inputs (tests/ops), so what the check runs
is what the tests run.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Optional

import torch

SKIP_ENV = "PATHMOE_OPS_SKIP_SELFCHECK"
MODES = ("dropless", "drop_and_pad")

# Sums of up to top-k rows, accumulated in fp32/fp64 (bf16/fp16 round once at the end).
SUM_TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.float64: dict(rtol=1e-15, atol=0),
           torch.bfloat16: dict(rtol=2**-7, atol=1e-5), torch.float16: dict(rtol=2**-10, atol=1e-6)}
# Gradients of probs are dot products over the hidden size (summation order differs).
DOT_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
           torch.bfloat16: dict(rtol=1e-2, atol=1e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}
EXACT = ("sorted_indices", "permuted", "permuted_probs")

# (tokens, experts, top-k, hidden, experts that receive no token, drop-and-pad capacity)
CHECK_CASE = (67, 9, 3, 37, 2)
CHECK_CAPACITY = 19


class SelfCheckError(RuntimeError):
    """The custom kernels disagree with the reference (or fail) on this device and dtype."""


def skipped() -> bool:
    return os.environ.get(SKIP_ENV) == "1"


def routing(tokens: int, experts: int, topk: int, empty: int, seed: int = 0):
    """A top-k routing map whose first `empty` experts get no token, and masked softmax probs."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g)
    logits[:, :empty] = float("-inf")
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool)
    routing_map.scatter_(1, logits.topk(topk, dim=1).indices, True)
    probs = torch.softmax(logits.masked_fill(~routing_map, float("-inf")), dim=-1)
    return routing_map, probs.nan_to_num(0.0)


def rand(*shape, dtype, seed):
    """Values in +-[0.5, 1.5): never zero, so a dropped or doubled row always shows."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) + 0.5).mul_(torch.randn(*shape, generator=g).sign()).to(dtype)


def forward_backward(impl: ModuleType, x: torch.Tensor, routing_map: torch.Tensor,
                     probs: torch.Tensor, weighted: bool, grad_seed: int = 7,
                     capacity: Optional[int] = None) -> dict:
    """permute -> (rows scaled by the permuted probs, or weighted unpermute) -> unpermute, then
    backward of a random gradient; returns every output and gradient. ``capacity``: drop-and-pad."""
    x = x.detach().clone().requires_grad_(True)
    probs = probs.detach().clone().requires_grad_(True)
    pad = dict(drop_and_pad=True) if capacity is not None else {}
    num_out = None if capacity is None else capacity * routing_map.shape[1]
    permuted, permuted_probs, sorted_indices = impl.permute(x, routing_map, probs=probs,
                                                            num_out_tokens=num_out, **pad)
    if weighted:
        out = impl.unpermute(permuted, sorted_indices, x.shape, probs=probs,
                             routing_map=routing_map, **pad)
    else:
        rows = permuted * permuted_probs.unsqueeze(-1).to(permuted.dtype)
        out = impl.unpermute(rows, sorted_indices, x.shape, routing_map=routing_map, **pad)
    out.backward(rand(*out.shape, dtype=out.dtype, seed=grad_seed).to(out.device))
    return dict(sorted_indices=sorted_indices, permuted=permuted.detach(),
                permuted_probs=permuted_probs.detach(), out=out.detach(), grad_x=x.grad,
                grad_probs=probs.grad)


def compare(got: dict, want: dict, dtype: torch.dtype) -> list[str]:
    """What differs between two forward_backward results (empty when they agree)."""
    problems = []
    for key, value in want.items():
        if key in EXACT:
            ok = got[key].shape == value.shape and torch.equal(got[key], value)
        else:
            tol = DOT_TOL[dtype] if key == "grad_probs" else SUM_TOL[dtype]
            ok = got[key].shape == value.shape and torch.allclose(
                got[key].to(value.dtype), value, equal_nan=False, **tol)
        if not ok:
            problems.append(key)
    return problems


def self_check(device: torch.device | str, dtype: torch.dtype, mode: str) -> None:
    """Custom kernels vs the reference on ``device`` in ``dtype``; ``mode`` is one of MODES.
    Raises SelfCheckError naming what differs (or the error the kernels raised)."""
    from megatron_pathmoe.ops import permutation, reference

    if mode not in MODES:
        raise ValueError(f"self-check mode must be one of {MODES}, got {mode!r}")
    tokens, experts, topk, hidden, empty = CHECK_CASE
    routing_map, probs = routing(tokens, experts, topk, empty, seed=11)
    x = rand(tokens, hidden, dtype=dtype, seed=12).to(device)
    routing_map, probs = routing_map.to(device), probs.to(device)
    capacity = CHECK_CAPACITY if mode == "drop_and_pad" else None
    # Inside a dispatcher call the caller may be in no_grad (evaluation): the check needs grads.
    with torch.inference_mode(False), torch.enable_grad():
        for weighted in (False, True):
            how = "weighted unpermute" if weighted else "probs in rows"
            want = forward_backward(reference, x, routing_map, probs, weighted, capacity=capacity)
            try:
                got = forward_backward(permutation, x, routing_map, probs, weighted,
                                       capacity=capacity)
            except Exception as error:  # noqa: BLE001 - any failure of the kernels is the finding
                raise SelfCheckError(f"{how}: {type(error).__name__}: {error}") from error
            problems = compare(got, want, dtype)
            if problems:
                raise SelfCheckError(f"{how}: {', '.join(problems)} differ from the reference")
