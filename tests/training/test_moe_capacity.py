"""Expert capacity (--moe-expert-capacity-factor, --moe-pad-expert-input-to-capacity,
--moe-token-drop-policy) under every routing variant: megatron-core drops tokens after the
router's top-k, so the routing decision (the path) is unchanged and only tokens over an
expert's capacity lose that expert."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_pathmoe.config import ConfigError, PathMoEConfig
from tests.unit.test_block_shared_router import TINY, batch

VARIANTS = {"independent": dict(routing="independent"),
            "path": dict(routing="path", path_block_size=2),
            "random": dict(routing="random"),
            "xmoe": dict(routing="xmoe", path_block_size=2),
            "recurrent": dict(routing="recurrent", recurrent_router_dim=8),
            "mono": dict(routing="mono", path_block_size=2),
            "lowrank": dict(routing="lowrank", lowrank_rank=2)}
SHAPE = dict(TINY, num_layers=4)
FACTOR = 0.5  # capacity = ceil(tokens * topk / experts * 0.5): about half the routed tokens


def expected_drop(probs: torch.Tensor, routing_map: torch.Tensor,
                  capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 'probs' policy by hand: each expert keeps the ``capacity`` tokens of highest
    probability among those routed to it (with padding, its other slots get zero-probability
    rows)."""
    keep = torch.zeros_like(routing_map)
    for expert in range(routing_map.shape[1]):
        routed = torch.nonzero(routing_map[:, expert]).flatten()
        order = probs[routed, expert].argsort(descending=True, stable=True)
        keep[routed[order[:capacity]], expert] = True
    return keep, probs * keep


class DropRecorder:
    """Records every ``apply_router_token_dropping`` call megatron's router makes: its input
    (the router's own decision) and output (what the dispatcher gets)."""

    def __init__(self, monkeypatch) -> None:
        from megatron.core.transformer.moe import router

        self.calls: list[dict] = []
        original = router.apply_router_token_dropping

        def record(probs, routing_map, **kwargs):
            out = original(probs, routing_map, **kwargs)
            self.calls.append(dict(probs=probs.detach().clone(), map=routing_map.clone(),
                                   out_probs=out[0].detach().clone(), out_map=out[1].clone(),
                                   **kwargs))
            return out

        monkeypatch.setattr(router, "apply_router_token_dropping", record)


def _forward(cfg: PathMoEConfig, outputs: dict | None = None) -> torch.Tensor:
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_pathmoe.model import build_gpt_model

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    model = build_gpt_model(cfg)
    handles = []
    if outputs is not None:
        handles = [layer.mlp.router.register_forward_hook(
            lambda m, i, out: outputs.__setitem__(m.layer_number, out[1].clone()))
            for layer in model.decoder.layers]
    tokens, positions = batch()
    loss = model(tokens, positions, None, labels=tokens).mean()
    for handle in handles:
        handle.remove()
    return loss


def _config(name: str, **extra) -> PathMoEConfig:
    return PathMoEConfig(**SHAPE, **VARIANTS[name], **extra).validate()


@pytest.mark.parametrize("pad", [False, True], ids=["drop", "pad"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_tokens_over_capacity_are_dropped_by_probability(megatron_world1, monkeypatch, name,
                                                         pad):
    recorder = DropRecorder(monkeypatch)
    routed = {}
    cfg = _config(name, moe_expert_capacity_factor=FACTOR,
                  moe_pad_expert_input_to_capacity=pad)
    assert torch.isfinite(_forward(cfg, routed))
    # mono decides once per block; every other variant in every layer.
    decisions = SHAPE["num_layers"] // (2 if name == "mono" else 1)
    assert len(recorder.calls) == decisions
    tokens = 2 * SHAPE["seq_length"]
    capacity = math.ceil(tokens * SHAPE["moe_router_topk"] / SHAPE["num_experts"] * FACTOR)
    dropped = 0
    for call in recorder.calls:
        assert call["capacity_factor"] == FACTOR and call["drop_policy"] == "probs"
        assert call["map"].sum(1).eq(SHAPE["moe_router_topk"]).all()  # the full top-k decision
        keep, probs = expected_drop(call["probs"], call["map"], capacity)
        kept = call["out_map"] & call["map"]
        assert torch.equal(kept, keep)
        torch.testing.assert_close(call["out_probs"], probs, rtol=0, atol=0)
        if pad:  # every expert processes exactly `capacity` rows
            assert call["out_map"].sum(0).eq(capacity).all()
        else:
            assert torch.equal(call["out_map"], keep)
            assert call["out_map"].sum(0).le(capacity).all()
        dropped += int(call["map"].sum() - kept.sum())
    assert dropped > 0
    # What the routers hand the dispatcher is the dropped map, in every layer (mono: the block's).
    outs = [c["out_map"] for c in recorder.calls]
    for layer, routing_map in routed.items():
        block = (layer - 1) // 2 if name == "mono" else layer - 1
        assert torch.equal(routing_map, outs[block])


@pytest.mark.parametrize("name", ["path", "mono"])
def test_dropping_leaves_the_routing_decision_unchanged(megatron_world1, monkeypatch, name):
    """Layer 1 sees the same input with and without capacity: the same top-k decision (the
    path's first step, for mono the whole block's), and capacity only removes tokens from it."""
    recorder = DropRecorder(monkeypatch)
    dropless = {}
    _forward(_config(name), dropless)
    _forward(_config(name, moe_expert_capacity_factor=FACTOR), {})
    first = recorder.calls[0]
    assert torch.equal(first["map"], dropless[1])
    assert not (first["out_map"] & ~dropless[1]).any()
    assert first["out_map"].sum() < dropless[1].sum()


def test_position_policy_is_megatrons(megatron_world1, monkeypatch):
    """--moe-token-drop-policy position reaches megatron's router: per expert, capacity of its
    routed tokens kept, chosen by megatron's position rule, not by probability."""
    from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping

    recorder = DropRecorder(monkeypatch)
    _forward(_config("path", moe_expert_capacity_factor=FACTOR,
                     moe_token_drop_policy="position"))
    tokens = 2 * SHAPE["seq_length"]
    capacity = math.ceil(tokens * SHAPE["moe_router_topk"] / SHAPE["num_experts"] * FACTOR)
    differs_from_probs = False
    for call in recorder.calls:
        assert call["drop_policy"] == "position"
        kept = call["out_map"]
        assert not (kept & ~call["map"]).any()
        assert torch.equal(kept.sum(0), call["map"].sum(0).clamp(max=capacity))
        by_probs, _ = apply_router_token_dropping(call["probs"], call["map"], router_topk=2,
                                                  capacity_factor=FACTOR, drop_policy="probs")
        differs_from_probs |= not torch.equal(kept, by_probs)
    assert differs_from_probs


def test_hand_computed_case():
    """6 tokens, 3 experts, top-1, factor 1: capacity 2; expert 0 is chosen by 4 tokens."""
    probs = torch.tensor([[.5, 0, 0], [.9, 0, 0], [.7, 0, 0], [0, .6, 0], [0, 0, .8],
                          [.95, 0, 0]])
    routing_map = probs > 0
    keep, kept_probs = expected_drop(probs, routing_map, capacity=2)
    assert torch.nonzero(keep[:, 0]).flatten().tolist() == [1, 5]  # 0.9 and 0.95
    assert keep[:, 1:].sum() == 2 and kept_probs[0, 0] == 0
    from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping

    _, megatron_map = apply_router_token_dropping(probs, routing_map, router_topk=1,
                                                  capacity_factor=1.0, drop_policy="probs")
    assert torch.equal(megatron_map, keep)


@pytest.mark.parametrize("pad", [False, True], ids=["drop", "pad"])
def test_custom_permutation_equals_megatrons_with_capacity(megatron_world1, pad):
    """The alltoall dispatcher with capacity (dropping, and padded to capacity): this project's
    permutation kernels train exactly like megatron-core's permute."""
    cfg = _config("path", moe_expert_capacity_factor=FACTOR, moe_aux_loss_coeff=1e-2,
                  moe_pad_expert_input_to_capacity=pad)
    runs = {impl: _train(cfg, impl) for impl in ("custom", "megatron")}
    assert runs["custom"][0] == runs["megatron"][0]
    assert len(set(runs["custom"][0])) == 3  # it trains
    for name, param in runs["megatron"][1].items():
        torch.testing.assert_close(runs["custom"][1][name], param, rtol=0, atol=1e-6, msg=name)


def _train(cfg: PathMoEConfig, impl: str, steps: int = 3):
    """A few production training steps (megatron DDP, optimizer) with ``--permute-impl``."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_pathmoe.ops import install_permute_impl, installed_permute_impl
    from megatron_pathmoe.training.arguments import TrainingConfig
    from megatron_pathmoe.training.build import build_model_and_optimizer
    from megatron_pathmoe.training.step import train_step

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    train = TrainingConfig(train_iters=steps, lr=1e-2, lr_warmup_iters=0, micro_batch_size=2,
                           global_batch_size=2, permute_impl=impl)
    try:
        chunks, optimizer, scheduler = build_model_and_optimizer(cfg, train, "cpu")
        assert installed_permute_impl() == impl
        tokens, positions = batch()
        data = dict(tokens=tokens, labels=tokens, position_ids=positions,
                    loss_mask=torch.ones(tokens.shape))
        losses = [train_step(chunks, optimizer, scheduler, iter([data]), cfg, train, 1).loss
                  for _ in range(steps)]
        return losses, {n: p.detach().clone() for n, p in chunks[0].module.named_parameters()}
    finally:
        install_permute_impl("auto", "cpu")


@pytest.mark.parametrize("flags, needle", [
    (dict(moe_expert_capacity_factor=0.0), "--moe-expert-capacity-factor"),
    (dict(moe_pad_expert_input_to_capacity=True), "needs --moe-expert-capacity-factor"),
    (dict(moe_expert_capacity_factor=1.0, moe_token_drop_policy="random"),
     "--moe-token-drop-policy"),
])
def test_bad_capacity_flags_fail_in_one_line(flags, needle):
    with pytest.raises(ConfigError) as err:
        PathMoEConfig(**SHAPE, **flags).validate()
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_capacity_flags_parse():
    from megatron_pathmoe.training.arguments import parse_args

    model, _ = parse_args(["--dry-run", "--dry-run-vocab-size", "128",
                           "--moe-expert-capacity-factor", "1.25",
                           "--moe-pad-expert-input-to-capacity",
                           "--moe-token-drop-policy", "position"])
    tc = model.to_transformer_config()
    assert (tc.moe_expert_capacity_factor, tc.moe_pad_expert_input_to_capacity,
            tc.moe_token_drop_policy) == (1.25, True, "position")
