"""The CUDA kernels against the CPU kernels (GPU machines only; skipped elsewhere).

Both accumulate each token's rows in ascending row order in fp32 without FMA contraction, so
what the kernels compute (indices, permuted rows, sums, the rows' gradients) must be bitwise
equal. The probs gradient is a dot product over the hidden size reduced in another order: by
the kernels in the weighted-unpermute mode, by torch's own mul-backward reduction (different
on CPU and CUDA) in the probs-in-rows mode; it gets a tolerance in both.
"""

from __future__ import annotations

import pytest
import torch

from megatron_pathmoe.ops import dispatcher, install_permute_impl, permutation, selfcheck
from megatron_pathmoe.ops.extension import load_extension
from tests.ops.test_permute_ops import CASES, DOT_TOL, DTYPES, forward_backward, rand, routing

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and load_extension().supports("cuda")),
    reason="needs a CUDA device and the CUDA kernels")


@pytest.fixture(autouse=True)
def real_cuda():
    """An earlier test's megatron_world1 leaves the CPU platform on, which maps cuda tensors to
    the CPU: these tests would then compare the CPU with itself."""
    from megatron_pathmoe.platform import cpu_platform_enabled, disable_cpu_platform, enable_cpu_platform

    was_on = cpu_platform_enabled()
    if was_on:
        disable_cpu_platform()
    yield
    if was_on:
        enable_cpu_platform()


def _to(results: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in results.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-E{}-k{}-H{}-empty{}".format(*c))
@pytest.mark.parametrize("weighted", [False, True], ids=["probs-in-rows", "weighted-unpermute"])
def test_cuda_equals_cpu(dtype, case, weighted):
    tokens, experts, topk, hidden, empty = case
    routing_map, probs = routing(tokens, experts, topk, empty)
    x = rand(tokens, hidden, dtype=dtype, seed=1)
    want = forward_backward(permutation, x, routing_map, probs, weighted)
    got = _to(forward_backward(permutation, x.cuda(), routing_map.cuda(), probs.cuda(), weighted),
              "cpu")
    for key, value in want.items():
        if key == "grad_probs":  # reduction order: torch's or the kernels' (see the docstring)
            torch.testing.assert_close(got[key], value, **DOT_TOL[dtype])
        else:
            assert torch.equal(got[key], value), key


@pytest.mark.parametrize("capacity", [0, 3, 40])
def test_cuda_drop_and_pad_equals_cpu(capacity):
    routing_map, probs = routing(64, 8, 2, empty=2)
    x = rand(64, 5, dtype=torch.float32, seed=1)
    results = []
    for device in ("cpu", "cuda"):
        permuted, permuted_probs, idx = permutation.permute(
            x.to(device), routing_map.to(device), probs.to(device), num_out_tokens=capacity * 8,
            drop_and_pad=True)
        out = permutation.unpermute(permuted, idx, x.shape, probs.to(device),
                                    routing_map.to(device), drop_and_pad=True)
        results.append([t.cpu() for t in (idx, permuted, permuted_probs, out)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_cuda_is_deterministic():
    routing_map, probs = routing(4096, 64, 6, empty=5)
    x = rand(4096, 1030, dtype=torch.bfloat16, seed=1).cuda()
    runs = [forward_backward(permutation, x, routing_map.cuda(), probs.cuda(), weighted=True)
            for _ in range(3)]
    for run in runs[1:]:
        for key, value in run.items():
            assert torch.equal(value, runs[0][key]), key


@pytest.mark.parametrize("mode", selfcheck.MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_self_check_passes_on_cuda(dtype, mode):
    selfcheck.self_check("cuda", dtype, mode)


def test_auto_keeps_the_checked_kernels_on_cuda(monkeypatch):
    monkeypatch.delenv(selfcheck.SKIP_ENV, raising=False)
    dispatcher._reset_self_checks()
    try:
        assert install_permute_impl("auto", device="cuda") == "custom"
        from megatron.core.transformer.moe import token_dispatcher

        routing_map, probs = routing(64, 8, 2, empty=2)
        x = rand(64, 5, dtype=torch.bfloat16, seed=1).cuda()
        forward_backward(token_dispatcher, x, routing_map.cuda(), probs.cuda(), weighted=True)
        report = dispatcher.permute_impl_report()
        assert report["installed"] == "custom", report
        assert report["self_checks"] == {"cuda:0 bfloat16 dropless": "passed"}, report
    finally:
        install_permute_impl("megatron")
        dispatcher._reset_self_checks()
