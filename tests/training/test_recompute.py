"""Activation recomputation (megatron-core's, --recompute-*) changes memory, never the maths:
the loss and every gradient equal the run without recomputation."""

from __future__ import annotations

import pytest
import torch

from megatron_pathmoe.config import ConfigError, PathMoEConfig
from megatron_pathmoe.platform.gpu import transformer_engine_importable
from tests.unit.test_block_shared_router import TINY, batch

_TE = transformer_engine_importable()

# Router losses on, so the recomputed router also re-attaches its aux and z losses.
LOSSES = dict(moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)
RECOMPUTE = {
    "full-uniform-1": dict(recompute_granularity="full", recompute_method="uniform",
                           recompute_num_layers=1),
    "full-uniform-4": dict(recompute_granularity="full", recompute_method="uniform",
                           recompute_num_layers=4),
    "full-block-3": dict(recompute_granularity="full", recompute_method="block",
                         recompute_num_layers=3),
    "selective-default": dict(recompute_granularity="selective"),  # megatron: core_attn
    "selective-moe": dict(recompute_granularity="selective", recompute_modules=["moe"]),
    "selective-all": dict(recompute_granularity="selective",
                          recompute_modules=["core_attn", "moe"]),
}
VARIANTS = {"path": dict(routing="path", path_block_size=2),
            "independent": dict(routing="independent"),
            "xmoe": dict(routing="xmoe", path_block_size=4),
            "lowrank": dict(routing="lowrank", lowrank_rank=2),
            "random": dict(routing="random")}


def _loss_and_grads(**overrides) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_pathmoe.model import build_gpt_model

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    cfg = PathMoEConfig(**{**TINY, "num_layers": 4, **LOSSES, **overrides}).validate()
    model = build_gpt_model(cfg)
    model.train()
    tokens, positions = batch()
    loss = model(tokens, positions, None, labels=tokens).mean()
    # torch.autograd.backward (as megatron's schedules): recomputation runs inside it, where
    # the CPU platform re-enters its CUDA->CPU mapping for megatron's checkpoint functions.
    torch.autograd.backward(loss)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_same(reference, other) -> None:
    (loss0, grads0), (loss1, grads1) = reference, other
    assert torch.equal(loss0, loss1), (loss0, loss1)
    assert grads0.keys() == grads1.keys() and len(grads0) > 10
    for name, grad in grads0.items():
        torch.testing.assert_close(grads1[name], grad, rtol=0, atol=1e-6, msg=name)
    # Experts (and, except the frozen random router, routers) do learn here: not a vacuous
    # equality of zeros.
    assert any(".experts." in n and g.abs().sum() > 0 for n, g in grads0.items())


@pytest.mark.parametrize("mode", list(RECOMPUTE))
def test_recompute_equals_none_path(megatron_world1, mode):
    variant = VARIANTS["path"]
    reference = _loss_and_grads(**variant)
    assert all(g.abs().sum() > 0 for n, g in reference[1].items() if ".router." in n)
    _assert_same(reference, _loss_and_grads(**variant, **RECOMPUTE[mode]))


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "path"])
def test_full_and_moe_recompute_equal_none_per_variant(megatron_world1, name):
    variant = VARIANTS[name]
    reference = _loss_and_grads(**variant)
    for mode in ("full-uniform-1", "selective-moe"):
        _assert_same(reference, _loss_and_grads(**variant, **RECOMPUTE[mode]))


def test_shared_expert_recompute_equals_none(megatron_world1):
    """--recompute-modules shared_experts (megatron's checkpoint of the shared expert)."""
    shared = dict(VARIANTS["path"], moe_shared_expert_intermediate_size=32,
                  moe_shared_expert_gate=True)
    reference = _loss_and_grads(**shared)
    assert any(".shared_experts." in n and g.abs().sum() > 0 for n, g in reference[1].items())
    _assert_same(reference, _loss_and_grads(**shared, recompute_granularity="selective",
                                            recompute_modules=["shared_experts"]))


def test_recompute_reaches_megatron(megatron_world1):
    """The flags land in megatron's TransformerConfig and its modules checkpoint."""
    cfg = PathMoEConfig(**{**TINY, "num_layers": 4}, routing="path", path_block_size=2,
                        **RECOMPUTE["selective-all"]).validate()
    tc = cfg.to_transformer_config()
    assert tc.recompute_granularity == "selective"
    assert tc.recompute_modules == ["core_attn", "moe"]
    full = PathMoEConfig(**TINY, **RECOMPUTE["full-block-3"]).validate().to_transformer_config()
    assert (full.recompute_method, full.recompute_num_layers) == ("block", 3)


@pytest.mark.parametrize("flags, needle", [
    (dict(recompute_granularity="full"), "needs --recompute-method"),
    (dict(recompute_granularity="full", recompute_method="uniform"), "--recompute-num-layers"),
    (dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=9),
     "--recompute-num-layers"),
    (dict(recompute_method="uniform", recompute_num_layers=1), "--recompute-granularity full"),
    (dict(recompute_modules=["moe"]), "--recompute-granularity selective"),
    (dict(recompute_granularity="selective", recompute_modules=["moe_act"]),
     "moe_act needs --moe-grouped-gemm"),
    (dict(recompute_granularity="selective", recompute_modules=["mlp"]), "mlp"),
    (dict(recompute_granularity="selective", recompute_modules=["shared_experts"]),
     "there is no shared expert"),
    pytest.param(dict(recompute_granularity="selective", recompute_modules=["layernorm"]),
                 "layernorm needs transformer-engine", marks=pytest.mark.skipif(
                     _TE, reason="transformer-engine imports: layernorm recompute allowed")),
    (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1,
          routing="recurrent"), "--routing recurrent"),
    (dict(recompute_granularity="selective", recompute_modules=["moe"], routing="mono",
          path_block_size=2), "--routing mono"),
])
def test_bad_recompute_flags_fail_in_one_line(flags, needle):
    with pytest.raises(ConfigError) as err:
        PathMoEConfig(**{**TINY, **flags}).validate()
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_carried_routing_state_allows_attention_recompute(megatron_world1):
    """recurrent and mono hand routing state between layers: recomputing attention (not the
    router) still works and changes nothing."""
    for variant in (dict(routing="recurrent", recurrent_router_dim=8),
                    dict(routing="mono", path_block_size=2)):
        _assert_same(_loss_and_grads(**variant),
                     _loss_and_grads(**variant, **RECOMPUTE["selective-default"]))


def test_recompute_flags_parse(tmp_path):
    from megatron_pathmoe.training.arguments import parse_args

    model, _ = parse_args(["--dry-run", "--dry-run-vocab-size", "128", "--num-layers", "4",
                           "--recompute-granularity", "full", "--recompute-method", "block",
                           "--recompute-num-layers", "2"])
    assert (model.recompute_granularity, model.recompute_method,
            model.recompute_num_layers) == ("full", "block", 2)
    model, _ = parse_args(["--dry-run", "--dry-run-vocab-size", "128",
                           "--recompute-granularity", "selective", "--recompute-modules",
                           "core_attn", "moe"])
    assert model.recompute_modules == ["core_attn", "moe"]
