"""BlockSharedRouter: ties, gradients, equivalence with independent routing, state dicts."""

from __future__ import annotations

import pytest
import torch

from megatron_pathmoe.config import PathMoEConfig
from megatron_pathmoe.routing import BlockSharedRouter, shared_router_weights

TINY = dict(num_layers=8, hidden_size=32, num_attention_heads=4, moe_ffn_hidden_size=48,
            seq_length=16, vocab_size=128, num_experts=4, moe_router_topk=2)


def build(routing: str, block_size: int = 1, seed: int = 0, **overrides):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_pathmoe.model import build_gpt_model

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    cfg = PathMoEConfig(**{**TINY, **overrides}, routing=routing, path_block_size=block_size)
    return build_gpt_model(cfg.validate())


def routers(model):
    return [layer.mlp.router for layer in model.decoder.layers]


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TINY["vocab_size"], (2, TINY["seq_length"]), generator=g)
    positions = torch.arange(TINY["seq_length"]).expand(2, -1)
    return tokens, positions


def loss_of(model) -> torch.Tensor:
    tokens, positions = batch()
    return model(tokens, positions, None, labels=tokens).mean()


@pytest.mark.parametrize("block_size", [1, 2, 4, 8])
def test_distinct_router_parameters_equal_num_blocks(megatron_world1, block_size):
    model = build("path", block_size)
    weights = {id(r.weight) for r in routers(model)}
    router_params = [n for n, _ in model.named_parameters() if ".router." in n]
    assert len(weights) == TINY["num_layers"] // block_size
    assert len(router_params) == TINY["num_layers"] // block_size
    # Every layer keeps its own module and layer number; the block owner is its first layer.
    assert [r.layer_number for r in routers(model)] == list(range(1, 9))
    for r in routers(model):
        owner = routers(model)[r.block_index * block_size]
        assert r.weight is owner.weight and owner.is_block_owner


def _copy_block_weights_to_independent(path_model, indep_model, block_size):
    with torch.no_grad():
        state = {k: v for k, v in path_model.state_dict().items() if ".router." not in k}
        indep_model.load_state_dict(state, strict=False)
        for i, r in enumerate(routers(indep_model)):
            r.weight.copy_(routers(path_model)[(i // block_size) * block_size].weight)


def test_tied_grad_is_sum_of_untied_per_layer_grads(megatron_world1):
    block_size = 4
    path_model = build("path", block_size, seed=3)
    indep_model = build("independent", seed=4)
    _copy_block_weights_to_independent(path_model, indep_model, block_size)

    loss_path, loss_indep = loss_of(path_model), loss_of(indep_model)
    torch.testing.assert_close(loss_path, loss_indep, rtol=0, atol=1e-6)
    loss_path.backward()
    loss_indep.backward()
    indep_grads = [r.weight.grad for r in routers(indep_model)]
    for block, weight in shared_router_weights(path_model).items():
        expected = sum(indep_grads[block * block_size:(block + 1) * block_size])
        assert weight.grad.abs().sum() > 0
        torch.testing.assert_close(weight.grad, expected, rtol=1e-5, atol=1e-8)


def test_block_size_one_equals_independent_routing(megatron_world1):
    path_model = build("path", 1, seed=5)
    indep_model = build("independent", seed=6)
    assert path_model.state_dict().keys() == indep_model.state_dict().keys()
    indep_model.load_state_dict(path_model.state_dict())
    tokens, positions = batch()
    logits_path = path_model(tokens, positions, None)
    logits_indep = indep_model(tokens, positions, None)
    torch.testing.assert_close(logits_path, logits_indep, rtol=0, atol=0)
    torch.testing.assert_close(loss_of(path_model), loss_of(indep_model), rtol=0, atol=0)


def test_state_dict_has_one_router_entry_per_block_and_round_trips(megatron_world1):
    block_size = 4
    source = build("path", block_size, seed=7)
    state = source.state_dict()
    router_keys = sorted(k for k in state if ".router." in k)
    assert router_keys == ["decoder.layers.0.mlp.router.weight",
                           "decoder.layers.4.mlp.router.weight"]

    target = build("path", block_size, seed=8)
    assert not torch.equal(routers(target)[0].weight, routers(source)[0].weight)
    target.load_state_dict(state)
    for r_src, r_tgt in zip(routers(source), routers(target)):
        torch.testing.assert_close(r_tgt.weight, r_src.weight, rtol=0, atol=0)
    # Loading must not break the tie: the block's layers still share one tensor.
    assert routers(target)[3].weight is routers(target)[0].weight
    torch.testing.assert_close(loss_of(target), loss_of(source), rtol=0, atol=0)


def test_aux_loss_is_tracked_per_layer(megatron_world1):
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    model = build("path", 4, seed=9, moe_aux_loss_coeff=0.01)
    clear_aux_losses_tracker()
    loss_of(model).backward()
    values = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"]
    assert values.shape == (TINY["num_layers"],)
    assert bool((values > 0).all()), "every layer (not only block owners) logs its aux loss"
    clear_aux_losses_tracker()


def test_router_classes(megatron_world1):
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_pathmoe.routing import IndependentRouter

    independent = routers(build("independent"))
    assert all(type(r) is IndependentRouter and isinstance(r, TopKRouter) for r in independent)
    # Independent routing overrides none of megatron's routing computation.
    for method in ("gating", "forward"):
        assert getattr(IndependentRouter, method) is getattr(TopKRouter, method)
    assert all(isinstance(r, BlockSharedRouter) for r in routers(build("path", 2)))
