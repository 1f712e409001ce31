"""The kernels' self-check at first use: passes on healthy kernels for every dtype and mode,
catches a wrong value, a wrong gradient and a crash; ``auto`` then falls back to
megatron-core with one warning, ``custom`` fails loudly, the skip switch skips."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from megatron_pathmoe.ops import (
    _kernels,
    dispatcher,
    install_permute_impl,
    installed_permute_impl,
    permute_impl_report,
    selfcheck,
)
from megatron_pathmoe.ops.selfcheck import forward_backward, rand, routing

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture
def fresh_checks(monkeypatch):
    monkeypatch.delenv(selfcheck.SKIP_ENV, raising=False)
    dispatcher._reset_self_checks()
    yield
    install_permute_impl("megatron")
    dispatcher._reset_self_checks()


def _dispatch(x: torch.Tensor, weighted: bool = True) -> dict:
    """A permute/unpermute round trip through the functions megatron-core's dispatchers call."""
    from megatron.core.transformer.moe import token_dispatcher

    routing_map, probs = routing(40, 6, 2, empty=1)
    return forward_backward(token_dispatcher, x, routing_map, probs, weighted)


def test_check_case_has_empty_experts_and_an_odd_hidden_size():
    tokens, experts, topk, hidden, empty = selfcheck.CHECK_CASE
    routing_map, _ = routing(tokens, experts, topk, empty, seed=11)
    assert hidden % 2 == 1 and empty > 0 and (routing_map.sum(0)[:empty] == 0).all()
    # Drop-and-pad: some experts overflow the capacity (drops), the empty ones are all padding.
    assert routing_map.sum(0).max() > selfcheck.CHECK_CAPACITY


@pytest.mark.parametrize("mode", selfcheck.MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_healthy_kernels_pass(dtype, mode):
    start = time.perf_counter()
    selfcheck.self_check("cpu", dtype, mode)
    print(f"self-check cpu {dtype} {mode}: {1e3 * (time.perf_counter() - start):.1f} ms")


def _wrong_sum(real):
    def wrong(src, offsets, slots, weights=None):
        out = real(src, offsets, slots, weights)
        out[-1, -1] += 0.125  # one element of one token: the smallest visible corruption
        return out
    return wrong


def _wrong_probs_grad(real):
    def wrong(*args, **kwargs):
        grad_rows, grad_weights = real(*args, **kwargs)
        return grad_rows, grad_weights * 1.01
    return wrong


@pytest.mark.parametrize("name,make,finding", [
    ("segment_sum_rows", _wrong_sum, "out, grad_x differ"),
    ("scatter_rows_and_dot", _wrong_probs_grad, "weighted unpermute: grad_probs differ"),
], ids=["values", "probs-gradient"])
def test_wrong_kernel_is_caught(monkeypatch, name, make, finding):
    monkeypatch.setattr(_kernels, name, make(getattr(_kernels, name)))
    for mode in selfcheck.MODES:
        with pytest.raises(selfcheck.SelfCheckError, match=finding):
            selfcheck.self_check("cpu", torch.float32, mode)


def test_auto_falls_back_to_megatron_with_one_warning(monkeypatch, fresh_checks, caplog):
    from megatron.core.transformer.moe import moe_utils

    monkeypatch.setattr(_kernels, "segment_sum_rows", _wrong_sum(_kernels.segment_sum_rows))
    assert install_permute_impl("auto", device="cpu") == "custom"
    x = rand(40, 5, dtype=torch.float32, seed=1)
    with caplog.at_level(logging.WARNING):
        got = _dispatch(x)
        again = _dispatch(x)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "self-check on cpu float32 dropless failed" in warnings[0].getMessage()
    assert installed_permute_impl() == "megatron"
    routing_map, probs = routing(40, 6, 2, empty=1)
    want = forward_backward(moe_utils, x, routing_map, probs, weighted=True)
    for result in (got, again):  # the first call already ran on megatron-core's permute
        for key, value in want.items():
            assert torch.equal(result[key], value), key
    report = permute_impl_report()
    assert report["requested"] == "auto" and report["installed"] == "megatron"
    assert "out, grad_x differ" in report["fallback_reason"]
    assert "differ" in report["self_checks"]["cpu float32 dropless"]


def test_custom_fails_loudly_on_a_crashing_kernel(monkeypatch, fresh_checks):
    def crash(*args, **kwargs):
        raise RuntimeError("CUDA error: no kernel image is available for execution")

    monkeypatch.setattr(_kernels, "scatter_rows", crash)
    install_permute_impl("custom", device="cpu")
    with pytest.raises(RuntimeError, match="--permute-impl custom: the permutation kernels "
                                           "self-check on cpu float32 dropless failed.*no kernel image"):
        _dispatch(rand(40, 5, dtype=torch.float32, seed=1))


def test_healthy_kernels_are_used_and_reported(fresh_checks):
    from megatron_pathmoe.ops import permutation

    assert install_permute_impl("auto", device="cpu") == "custom"
    x = rand(40, 5, dtype=torch.bfloat16, seed=1)
    with torch.no_grad():  # evaluation: the check still computes its gradients
        from megatron.core.transformer.moe import token_dispatcher
        routing_map, _ = routing(40, 6, 2, empty=1)
        token_dispatcher.permute(x, routing_map)
    got = _dispatch(x, weighted=False)
    routing_map, probs = routing(40, 6, 2, empty=1)
    want = forward_backward(permutation, x, routing_map, probs, weighted=False)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    report = permute_impl_report()
    assert report == {"requested": "auto", "installed": "custom", "device": "cpu",
                      "fallback_reason": None,
                      "self_checks": {"cpu bfloat16 dropless": "passed"}}


def test_skip_switch_skips_the_check(monkeypatch, fresh_checks):
    monkeypatch.setenv(selfcheck.SKIP_ENV, "1")
    monkeypatch.setattr(_kernels, "segment_sum_rows", _wrong_sum(_kernels.segment_sum_rows))
    install_permute_impl("custom", device="cpu")
    _dispatch(rand(40, 5, dtype=torch.float32, seed=1))
    assert installed_permute_impl() == "custom"
    assert permute_impl_report()["self_checks"] == {"cpu float32 dropless": "skipped"}
