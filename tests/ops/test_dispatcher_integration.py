"""install_permute_impl and megatron-core's token dispatchers running on the custom ops."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_pathmoe.ops import dispatcher, extension, install_permute_impl, installed_permute_impl

HIDDEN, EXPERTS, TOPK = 24, 6, 3


@pytest.fixture
def restore_megatron_permute():
    yield
    install_permute_impl("megatron")


def test_install_is_idempotent_and_reversible(megatron_world1, restore_megatron_permute):
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    assert install_permute_impl("auto") == "custom"  # the CPU kernels build in CI
    assert install_permute_impl("custom") == "custom"
    # The kernels behind their first-use self-check (tests/ops/test_selfcheck.py).
    assert token_dispatcher.permute is dispatcher.checked_permute
    assert token_dispatcher.unpermute is dispatcher.checked_unpermute
    assert install_permute_impl("reference") == installed_permute_impl() == "reference"
    assert install_permute_impl("megatron") == installed_permute_impl() == "megatron"
    assert token_dispatcher.permute is moe_utils.permute
    assert token_dispatcher.unpermute is moe_utils.unpermute
    with pytest.raises(ValueError, match="--permute-impl must be one of"):
        install_permute_impl("fast")


def test_auto_falls_back_to_megatron_with_a_reason(megatron_world1, restore_megatron_permute,
                                                   caplog, monkeypatch):
    # A build without CUDA kernels (as on CPU machines; faked so that a GPU machine's CUDA
    # build does not change the test): auto must say so and keep megatron's functions.
    cpu_only = extension.Extension(SimpleNamespace(has_cuda=False))
    monkeypatch.setattr(dispatcher, "load_extension", lambda: cpu_only)
    with caplog.at_level("WARNING"):
        assert install_permute_impl("auto", device="cuda") == "megatron"
    assert "not available" in caplog.text and "cuda" in caplog.text
    with pytest.raises(RuntimeError, match="--permute-impl custom"):
        install_permute_impl("custom", device="cuda")


def _moe_layer(dispatcher: str, dtype: torch.dtype, capacity_factor=None, pad=False):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(0)
    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, num_moe_experts=EXPERTS,
        moe_router_topk=TOPK, moe_ffn_hidden_size=20, moe_token_dispatcher_type=dispatcher,
        moe_aux_loss_coeff=0.0, add_bias_linear=False, use_cpu_initialization=True,
        moe_expert_capacity_factor=capacity_factor, moe_pad_expert_input_to_capacity=pad,
        moe_router_dtype="fp32", params_dtype=dtype, bf16=dtype == torch.bfloat16)
    spec = get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False)
    return MoELayer(config, spec.submodules.mlp.submodules).to(dtype)


def _forward_backward(layer, impl: str, dtype: torch.dtype):
    install_permute_impl(impl)
    layer.zero_grad()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 2, HIDDEN, generator=g).to(dtype).requires_grad_(True)
    out, _ = layer(x)
    out.backward(torch.randn(9, 2, HIDDEN, generator=g).to(dtype))
    return [out.detach(), x.grad] + [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize("dispatcher,capacity_factor,pad", [
    ("allgather", None, False),
    ("alltoall", None, False),
    ("alltoall", 1.0, False),  # capacity drops tokens
    ("alltoall", 1.0, True),   # drop-and-pad to capacity
], ids=["allgather", "alltoall", "alltoall-drop", "alltoall-drop-and-pad"])
def test_moe_layer_custom_equals_megatron_fp32(megatron_world1, restore_megatron_permute,
                                                 dispatcher, capacity_factor, pad):
    layer = _moe_layer(dispatcher, torch.float32, capacity_factor, pad)
    want = _forward_backward(layer, "megatron", torch.float32)
    for impl in ("custom", "reference"):
        got = _forward_backward(layer, impl, torch.float32)
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), (impl, i)


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
def test_moe_layer_custom_matches_megatron_bf16(megatron_world1, restore_megatron_permute,
                                                dispatcher):
    """bf16: megatron-core adds a token's expert outputs in bf16, the custom ops in fp32 and
    round once, so the two agree to bf16 rounding."""
    layer = _moe_layer(dispatcher, torch.bfloat16)
    want = _forward_backward(layer, "megatron", torch.bfloat16)
    got = _forward_backward(layer, "custom", torch.bfloat16)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
