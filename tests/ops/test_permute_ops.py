"""The compiled permutation ops against the pure-PyTorch reference and megatron-core.

Inputs are random and never zero; routing maps leave some experts without tokens. Indices and
permuted rows must be identical; sums (fp32 accumulation, ascending row order in both) too,
up to the stated tolerances.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.moe import moe_utils

from megatron_pathmoe.ops import _kernels, permutation, reference
from megatron_pathmoe.ops.extension import load_extension
# The inputs and tolerances are the self-check's (what a run checks is what the tests check).
from megatron_pathmoe.ops.selfcheck import DOT_TOL, SUM_TOL, forward_backward, rand, routing

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# (tokens, experts, top-k, hidden, experts that receive no token)
CASES = [
    (0, 4, 2, 8, 0),
    (1, 1, 1, 1, 0),
    (5, 2, 2, 3, 0),
    (64, 8, 1, 17, 3),
    (64, 8, 3, 130, 2),
    (100, 7, 7, 9, 0),
    (257, 33, 5, 64, 0),
    (300, 16, 4, 33, 5),
    (128, 64, 6, 1, 40),
    (300, 64, 8, 7, 20),
    (33, 12, 2, 255, 4),
]


def test_extension_is_built_for_cpu():
    extension = load_extension()
    assert extension.supports("cpu"), extension.reason


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-E{}-k{}-H{}-empty{}".format(*c))
@pytest.mark.parametrize("weighted", [False, True], ids=["probs-in-rows", "weighted-unpermute"])
def test_matches_reference(dtype, case, weighted):
    tokens, experts, topk, hidden, empty = case
    routing_map, probs = routing(tokens, experts, topk, empty)
    x = rand(tokens, hidden, dtype=dtype, seed=1)
    got = forward_backward(permutation, x, routing_map, probs, weighted)
    want = forward_backward(reference, x, routing_map, probs, weighted)
    for key in ("sorted_indices", "permuted", "permuted_probs"):
        assert torch.equal(got[key], want[key]), key
    torch.testing.assert_close(got["out"], want["out"], **SUM_TOL[dtype])
    torch.testing.assert_close(got["grad_x"], want["grad_x"], **SUM_TOL[dtype])
    torch.testing.assert_close(got["grad_probs"], want["grad_probs"], **DOT_TOL[dtype])
    if tokens:
        assert got["sorted_indices"].numel() == tokens * topk
        assert (routing_map.sum(0)[:empty] == 0).all()


@pytest.mark.parametrize("case", CASES[3:], ids=lambda c: "T{}-E{}-k{}-H{}-empty{}".format(*c))
def test_matches_megatron_core_fp32_bitwise(case):
    """Same indices, rows and sums as megatron-core 0.16.1's unfused permute/unpermute (the
    gradient of weighting probs is a dot product over the hidden size, summed in another
    order)."""
    tokens, experts, topk, hidden, empty = case
    routing_map, probs = routing(tokens, experts, topk, empty)
    x = rand(tokens, hidden, dtype=torch.float32, seed=1)
    for weighted in (False, True):
        got = forward_backward(permutation, x, routing_map, probs, weighted)
        want = forward_backward(moe_utils, x, routing_map, probs, weighted)
        for key, value in got.items():
            if weighted and key == "grad_probs":
                torch.testing.assert_close(value, want[key], **DOT_TOL[torch.float32])
            else:
                assert torch.equal(value, want[key]), (key, weighted)


@pytest.mark.parametrize("capacity", [0, 1, 3, 40, 64])
def test_drop_and_pad_matches_megatron_core_and_reference(capacity):
    """Capacity below, between and above the per-expert counts (experts 0-1 get no token,
    so they are all padding)."""
    routing_map, probs = routing(64, 8, 2, empty=2)
    x = rand(64, 5, dtype=torch.float32, seed=1)
    num_out = capacity * 8 + 3  # megatron floors num_out_tokens / experts
    results = []
    for impl in (permutation, reference, moe_utils):
        xi = x.clone().requires_grad_(True)
        pi = probs.clone().requires_grad_(True)
        permuted, permuted_probs, idx = impl.permute(xi, routing_map, pi, num_out_tokens=num_out,
                                                     drop_and_pad=True)
        out = impl.unpermute(permuted * 1.5, idx, xi.shape, pi, routing_map, drop_and_pad=True)
        out.backward(rand(64, 5, dtype=torch.float32, seed=3))
        results.append([idx, permuted, permuted_probs, out, xi.grad, pi.grad])
    for got in results[:2]:
        for a, b in zip(got, results[2]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert results[0][0].numel() == capacity * 8


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("topk", [1, 2, 3, 4, 8])
def test_round_trip_with_probs_one_over_k_returns_input(dtype, topk):
    routing_map, _ = routing(96, 16, topk, empty=3, seed=topk)
    probs = routing_map.to(torch.float32) / topk
    x = rand(96, 19, dtype=dtype, seed=2).requires_grad_(True)
    permuted, _, idx = permutation.permute(x, routing_map, probs)
    out = permutation.unpermute(permuted, idx, x.shape, probs, routing_map)
    grad = rand(96, 19, dtype=dtype, seed=4)
    out.backward(grad)
    # x * (1/k) summed k times is exact for powers of two, within an fp32 rounding otherwise.
    torch.testing.assert_close(out, x.detach(), rtol=4e-7 if dtype == torch.float32 else None,
                               atol=4e-7 if dtype == torch.float32 else None)
    torch.testing.assert_close(x.grad, grad, rtol=4e-7 if dtype == torch.float32 else None,
                               atol=4e-7 if dtype == torch.float32 else None)


def test_gradcheck_float64():
    routing_map, probs = routing(7, 5, 2, empty=1, seed=3)
    x = rand(7, 3, dtype=torch.float64, seed=5).requires_grad_(True)
    probs = probs.to(torch.float64).requires_grad_(True)

    def weighted(x, probs):
        permuted, _, idx = permutation.permute(x, routing_map)
        return permutation.unpermute(permuted * permuted, idx, x.shape, probs, routing_map)

    def probs_in_rows(x, probs):
        permuted, permuted_probs, idx = permutation.permute(x, routing_map, probs)
        return permutation.unpermute(permuted * permuted_probs.unsqueeze(-1), idx, x.shape)

    assert torch.autograd.gradcheck(weighted, (x, probs))
    assert torch.autograd.gradcheck(probs_in_rows, (x, probs))


def test_large_rows_deterministic_and_independent_of_thread_count():
    """Outputs over 8 MiB take the streaming-store path; 2060-byte rows are not 16-byte
    multiples, so row heads and tails are exercised. Results must not depend on threads."""
    routing_map, probs = routing(2048, 16, 4, empty=2)
    x = rand(2048, 1030, dtype=torch.bfloat16, seed=1)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(forward_backward(permutation, x, routing_map, probs, weighted=True))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for key, value in run.items():
            assert torch.equal(value, runs[0][key]), key
    want = forward_backward(reference, x, routing_map, probs, weighted=True)
    assert torch.equal(runs[0]["permuted"], want["permuted"])
    torch.testing.assert_close(runs[0]["out"], want["out"], **SUM_TOL[torch.bfloat16])
    torch.testing.assert_close(runs[0]["grad_x"], want["grad_x"], **SUM_TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_conversions_match_torch_for_every_bit_pattern(dtype):
    """Every 16-bit pattern through load -> scale in fp32 -> round-to-nearest-even store, with
    scales that reach subnormals, overflow and exact ties; NaN only needs to stay NaN."""
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    src = patterns.reshape(-1, 1).contiguous()
    offsets, slots = torch.arange(src.shape[0] + 1), torch.arange(src.shape[0])
    for scale in (1.0, 0.3, 1.0 / 3.0, 2.0**-12, 2.0**-24, 65504.0, 1e-30, 7.5):
        weights = torch.full((src.shape[0],), scale)
        got = _kernels.scatter_rows(src, offsets, slots, src.shape[0], weights)
        want = (src.float() * scale).to(dtype)
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan), scale
        assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16)), scale


def test_empty_inputs():
    routing_map = torch.zeros(0, 4, dtype=torch.bool)
    x = torch.empty(0, 6, requires_grad=True)
    permuted, probs, idx = permutation.permute(x, routing_map, torch.empty(0, 4))
    assert permuted.shape == (0, 6) and probs.shape == (0,) and idx.shape == (0,)
    out = permutation.unpermute(permuted, idx, x.shape)
    out.sum().backward()
    assert out.shape == (0, 6) and x.grad.shape == (0, 6)
    # Tokens routed nowhere get zeros back.
    routing_map = torch.zeros(3, 2, dtype=torch.bool)
    routing_map[1, 0] = True
    permuted, _, idx = permutation.permute(torch.ones(3, 4), routing_map)
    out = permutation.unpermute(permuted, idx, torch.Size((3, 4)))
    assert torch.equal(out, torch.tensor([[0.0] * 4, [1.0] * 4, [0.0] * 4]))


def test_bad_input_is_named():
    routing_map, probs = routing(8, 4, 2, empty=0)
    x = torch.randn(8, 3)
    with pytest.raises(ValueError, match="tokens must be"):
        permutation.permute(x.unsqueeze(0), routing_map)
    with pytest.raises(ValueError, match="routing_map must be"):
        permutation.permute(x, routing_map[:5])
    with pytest.raises(ValueError, match="probs must have"):
        permutation.permute(x, routing_map, probs[:, :2])
    with pytest.raises(TypeError, match="tokens have dtype torch.int32; supported"):
        permutation.permute(x.to(torch.int32), routing_map)
    with pytest.raises(ValueError, match="moe-expert-capacity-factor"):
        permutation.permute(x, routing_map, num_out_tokens=4 * 9, drop_and_pad=True)
    permuted, _, idx = permutation.permute(x, routing_map)
    with pytest.raises(ValueError, match="outside"):
        permutation.unpermute(permuted, idx + 8, x.shape)
    with pytest.raises(ValueError, match="permuted_tokens must be"):
        permutation.unpermute(permuted[:3], idx, x.shape)
    with pytest.raises(ValueError, match="pass the map given to permute"):
        permutation.unpermute(permuted, idx, x.shape, probs, routing_map[:, :3].contiguous())
