"""Golden routing tables: every variant on tiny hand-made inputs and weights.

Expected expert ids are written out by hand; expected probabilities come from a few lines of
numpy in this file (softmax, cosine, GRU), never from the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_pathmoe.config import PathMoEConfig

H, E = 4, 4
EYE = np.eye(E, H)


def make_routers(routing: str, num_layers: int = 2, topk: int = 2, **extra):
    """The routers of one model build, numbered like megatron numbers them (1-based)."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_pathmoe.routing import build_router_builder

    cfg = PathMoEConfig(num_layers=num_layers, hidden_size=H, num_attention_heads=1,
                        num_experts=E, moe_router_topk=topk, routing=routing, **extra).validate()
    builder = build_router_builder(cfg)
    config, pg = cfg.to_transformer_config(), get_default_pg_collection()
    routers = []
    for layer in range(1, num_layers + 1):
        router = builder(config=config, pg_collection=pg)
        router.set_layer_number(layer)
        routers.append(router)
    return routers


def tokens(*rows) -> torch.Tensor:
    """[tokens, 1, hidden]: megatron's [seq, batch, hidden] with batch 1."""
    return torch.tensor(rows, dtype=torch.float32).unsqueeze(1)


def set_(param, value) -> None:
    with torch.no_grad():
        param.copy_(torch.as_tensor(np.array(value), dtype=param.dtype))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def check(router, x: torch.Tensor, expected_ids: list[set[int]], logits: np.ndarray,
          pre_softmax: bool = True) -> None:
    """The router's (probs, routing_map) against the hand-written ids and numpy probs."""
    probs, routing_map = router(x)
    assert [set(np.flatnonzero(row)) for row in routing_map.numpy()] == expected_ids
    expected = np.zeros_like(logits)
    for t, ids in enumerate(expected_ids):
        ids = sorted(ids)
        full = softmax(logits[t])
        expected[t, ids] = full[ids] if pre_softmax else softmax(logits[t, ids])
    np.testing.assert_allclose(probs.detach().numpy(), expected, rtol=1e-5, atol=1e-7)


X1 = [[3.0, 1.0, 0.0, 2.0], [0.0, 2.0, 3.0, 1.0], [1.0, 0.0, 2.0, 3.0]]
X1_TOP2 = [{0, 3}, {1, 2}, {2, 3}]


@pytest.mark.parametrize("routing", ["independent", "random"])
def test_single_layer_linear_gate(megatron_world1, routing):
    (router,) = make_routers(routing, num_layers=1)
    set_(router.weight, EYE)  # logits = x
    check(router, tokens(*X1), X1_TOP2, np.array(X1))


def test_post_softmax_and_top1(megatron_world1):
    (router,) = make_routers("independent", num_layers=1, moe_router_pre_softmax=False)
    set_(router.weight, EYE)
    check(router, tokens(*X1), X1_TOP2, np.array(X1), pre_softmax=False)
    (router,) = make_routers("independent", num_layers=1, topk=1)
    set_(router.weight, EYE)
    check(router, tokens(*X1), [{0}, {2}, {3}], np.array(X1))


def test_path_block_shares_one_weight(megatron_world1):
    first, second = make_routers("path", num_layers=2, path_block_size=2)
    set_(first.weight, EYE[::-1])  # logits = x reversed; the second layer sees the same gate
    x2 = [[0.0, 1.0, 3.0, 2.0], [3.0, 2.0, 1.0, 0.0], [1.0, 3.0, 0.0, 2.0]]
    check(first, tokens(*X1), [{0, 3}, {1, 2}, {0, 1}], np.array(X1)[:, ::-1])
    check(second, tokens(*x2), [{0, 1}, {2, 3}, {0, 2}], np.array(x2)[:, ::-1])


def test_mono_followers_reuse_the_first_layers_decision(megatron_world1):
    first, second = make_routers("mono", num_layers=2, path_block_size=2)
    set_(first.weight, EYE)
    probs1, map1 = first(tokens(*X1))
    # Input that the shared gate would route elsewhere: ignored by the follower.
    probs2, map2 = second(tokens(*[row[::-1] for row in X1]))
    assert probs2 is probs1 and map2 is map1
    assert [set(np.flatnonzero(r)) for r in map2.numpy()] == X1_TOP2


def test_lowrank_adds_the_layers_low_rank_correction(megatron_world1):
    first, second = make_routers("lowrank", num_layers=2, lowrank_rank=1)
    set_(first.weight, EYE)  # W_base, shared
    a = [[0.0], [0.0], [5.0], [0.0]]  # A_2: pushes expert 2 by 5 * (B_2 x)
    b = [[1.0, 0.0, 0.0, 0.0]]  # B_2: reads the first feature
    set_(second.lowrank_a, a)
    set_(second.lowrank_b, b)
    x = np.array(X1)
    check(first, tokens(*X1), X1_TOP2, x)  # A_1 = 0 at initialisation: the base router
    logits2 = x @ (EYE + np.array(a) @ np.array(b)).T
    check(second, tokens(*X1), [{0, 2}, {1, 2}, {2, 3}], logits2)
    np.testing.assert_allclose(second.export_gate_weight().numpy(),
                               EYE + np.array(a) @ np.array(b), rtol=0, atol=1e-7)


def _xmoe_reference(x: np.ndarray, proj: np.ndarray, emb: np.ndarray, tau: float) -> np.ndarray:
    z = x @ proj.T
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    e = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    return z @ e.T / tau


@pytest.mark.parametrize("block_size", [1, 2])
def test_xmoe_cosine_routing(megatron_world1, block_size):
    first, second = make_routers("xmoe", num_layers=2, xmoe_dim=2, path_block_size=block_size,
                                 xmoe_temperature_min=0.1, xmoe_temperature_init=0.3,
                                 xmoe_temperature_max=1.1)
    proj = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    emb = np.array([[2.0, 0], [0, 1.0], [-1.0, 0], [0, -3.0]])  # norms must not matter
    set_(first.projection, proj)
    set_(first.expert_embeddings, emb)
    set_(first.temperature_logit, [0.0])  # sigmoid(0) = 1/2: tau = 0.1 + 0.5 = 0.6
    x = np.array([[2.0, 1.0, 5.0, 5.0], [-1.0, 3.0, 0.0, 0.0], [-3.0, -1.0, 7.0, 1.0]])
    assert first.temperature().item() == pytest.approx(0.6)
    check(first, tokens(*x), [{0, 1}, {1, 2}, {2, 3}], _xmoe_reference(x, proj, emb, 0.6))
    assert (second.projection is first.projection) == (block_size == 2)
    if block_size == 2:  # PathB2X-MoE: the second layer routes with the same parameters
        check(second, tokens(*x), [{0, 1}, {1, 2}, {2, 3}], _xmoe_reference(x, proj, emb, 0.6))


def test_recurrent_gru_state_runs_over_depth(megatron_world1):
    routers = make_routers("recurrent", num_layers=3, recurrent_router_dim=2)
    rng = np.random.default_rng(0)
    w_in = [rng.normal(size=(2, H)) for _ in routers]
    w_out = [rng.normal(size=(E, 2)) * 3 for _ in routers]
    reference_cell = torch.nn.GRUCell(2, 2)  # torch's own GRU, as the independent reference
    for r, a, b in zip(routers, w_in, w_out):
        set_(r.weight_in, a)
        set_(r.weight_out, b)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        set_(getattr(routers[0].gru, name), getattr(reference_cell, name).detach().numpy())
    xs = [rng.normal(size=(5, H)) for _ in routers]
    state = None
    for r, x, a, b in zip(routers, xs, w_in, w_out):
        inputs = torch.tensor(x @ a.T, dtype=torch.float32)
        state = reference_cell(inputs, state)
        logits = state.detach().numpy() @ b.T
        expected_ids = [set(np.argsort(-row)[:2]) for row in logits]
        check(r, tokens(*x), expected_ids, logits)


@pytest.mark.parametrize("topk", [1, 2, 3, 4])
def test_any_top_k(megatron_world1, topk):
    (router,) = make_routers("path", num_layers=1, topk=topk, path_block_size=1)
    set_(router.weight, EYE)
    x = np.array([[0.5, 3.0, -1.0, 2.0], [4.0, -2.0, 1.0, 0.0]])
    order = [[1, 3, 0, 2], [0, 2, 3, 1]]  # experts by decreasing logit, by hand
    check(router, tokens(*x), [set(row[:topk]) for row in order], x)
