"""Each routing variant in a whole model: what it shares, what it trains, what it exports."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_pathmoe.config import PathMoEConfig
from tests.unit.test_block_shared_router import TINY, batch, build, loss_of, routers

VARIANTS = {  # name -> extra config: every routing flag combination the paper uses
    "independent": {}, "path": {"path_block_size": 4}, "random": {}, "xmoe": {},
    "xmoe_b4": {"routing": "xmoe", "path_block_size": 4}, "recurrent": {},
    "mono": {"path_block_size": 4}, "lowrank": {"lowrank_rank": 2},
}


def build_variant(name: str, seed: int = 0, **overrides):
    extra = dict(VARIANTS[name])
    routing = extra.pop("routing", name)
    return build(routing, extra.pop("path_block_size", None), seed=seed, **extra, **overrides)


def routing_maps(model) -> list[torch.Tensor]:
    """Each layer's routing map for the test batch, via forward hooks."""
    maps: dict[int, torch.Tensor] = {}
    handles = [r.register_forward_hook(
        lambda m, i, out: maps.__setitem__(m.layer_number, out[1].clone()))
        for r in routers(model)]
    with torch.no_grad():
        tokens, positions = batch()
        model(tokens, positions, None)
    for h in handles:
        h.remove()
    return [maps[layer] for layer in sorted(maps)]


def train_steps(model_cfg: PathMoEConfig, steps: int = 2):
    """A few real training steps (megatron DDP, optimizer, finalize_model_grads)."""
    from megatron_pathmoe.training.arguments import TrainingConfig
    from megatron_pathmoe.training.build import build_model_and_optimizer
    from megatron_pathmoe.training.step import train_step

    train = TrainingConfig(train_iters=steps, lr=1e-2, lr_warmup_iters=0, micro_batch_size=2,
                           global_batch_size=2)
    chunks, optimizer, scheduler = build_model_and_optimizer(model_cfg, train, "cpu")
    tokens, positions = batch()
    data = dict(tokens=tokens, labels=tokens, position_ids=positions,
                loss_mask=torch.ones(tokens.shape))
    before = {n: p.detach().clone() for n, p in chunks[0].module.named_parameters()}
    losses = [train_step(chunks, optimizer, scheduler, iter([data]), model_cfg, train, 1).loss
              for _ in range(steps)]
    return chunks, optimizer, before, losses


def config(routing: str, **extra) -> PathMoEConfig:
    return PathMoEConfig(**{**TINY, **extra}, routing=routing).validate()


# --------------------------------------------------------------------------- every variant

@pytest.mark.parametrize("name", list(VARIANTS))
def test_router_parameters_carry_sequence_parallel_and_ties(megatron_world1, name):
    """The cross-helper contract: one registered Parameter per tie with stable key and layer
    numbers; every router Parameter tagged like megatron's router weight."""
    from megatron_pathmoe.routing import tied_router_parameters

    model = build_variant(name)
    router_params = [p for n, p in model.named_parameters() if ".router." in n]
    assert router_params and all(hasattr(p, "sequence_parallel") for p in router_params)
    ties = tied_router_parameters(model)
    for key, param in ties.items():
        assert param.pathmoe_tie == key and len(param.pathmoe_tie_layers) > 1
        assert sum(p is param for p in router_params) == 1
    expected = {"independent": set(), "random": set(), "xmoe": set(),
                "path": {"path.block0.weight", "path.block1.weight"},
                "mono": {"mono.block0.weight", "mono.block1.weight"},
                "xmoe_b4": {f"xmoe.block{b}.{n}" for b in (0, 1)
                            for n in ("projection", "expert_embeddings", "temperature_logit")},
                "recurrent": {f"recurrent.gru.{n}"
                              for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")},
                "lowrank": {"lowrank.base"}}[name]
    assert set(ties) == expected
    for param in ties.values():
        span = (1, 2, 3, 4) if ".block0." in param.pathmoe_tie else \
            (5, 6, 7, 8) if ".block1." in param.pathmoe_tie else tuple(range(1, 9))
        assert param.pathmoe_tie_layers == span


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_trains_and_logs_entropy(megatron_world1, name):
    from megatron_pathmoe.training.metrics import ExpertLoadTracker

    extra = dict(VARIANTS[name])
    cfg = config(extra.pop("routing", name), moe_aux_loss_coeff=0.01, moe_z_loss_coeff=1e-3,
                 **extra)
    from megatron_pathmoe.training.arguments import TrainingConfig
    from megatron_pathmoe.training.build import build_model_and_optimizer
    from megatron_pathmoe.training.step import train_step

    train = TrainingConfig(train_iters=3, lr=1e-2, lr_warmup_iters=0, micro_batch_size=2,
                           global_batch_size=2)
    chunks, optimizer, scheduler = build_model_and_optimizer(cfg, train, "cpu")
    tracker = ExpertLoadTracker(chunks, cfg.num_layers, cfg.num_experts)
    tokens, positions = batch()
    data = dict(tokens=tokens, labels=tokens, position_ids=positions,
                loss_mask=torch.ones(tokens.shape))
    losses = [train_step(chunks, optimizer, scheduler, iter([data]), cfg, train, 1).loss
              for _ in range(3)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    entropy = tracker.pop_entropy()
    assert entropy.shape == (cfg.num_layers,)
    assert bool(((entropy > 0) & (entropy <= math.log(cfg.num_experts) + 1e-6)).all())
    assert tracker.pop_load().sum(1).allclose(torch.full((cfg.num_layers,), 4.0, dtype=torch.float64))
    tracker.remove()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_gate_weight_reproduces_logits_or_says_why_not(megatron_world1, name):
    from megatron_pathmoe.routing import RoutingExportError

    model = build_variant(name)
    x = torch.randn(5, 1, TINY["hidden_size"])
    for router in routers(model):
        if name in ("xmoe", "xmoe_b4", "recurrent", "mono"):
            with pytest.raises(RoutingExportError, match=f"--routing {name.split('_')[0]}"):
                router.export_gate_weight()
            continue
        if name == "lowrank":  # make the per-layer correction non-zero
            with torch.no_grad():
                router.lowrank_a.normal_()
        weight = router.export_gate_weight()
        assert weight.dtype == torch.float32 and weight.shape == (TINY["num_experts"],
                                                                  TINY["hidden_size"])
        torch.testing.assert_close(x.squeeze(1) @ weight.T, router.gating(x).squeeze(1),
                                   rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- per variant

def test_random_router_is_frozen_but_saved(megatron_world1):
    cfg = config("random")
    chunks, optimizer, before, _ = train_steps(cfg)
    model = chunks[0].module
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        if ".router." in name:
            assert not param.requires_grad and id(param) not in in_optimizer
            assert torch.equal(param, before[name]), f"{name} moved"
            assert name in model.state_dict()
        elif "experts" in name:
            assert not torch.equal(param, before[name]), f"{name} did not train"


def test_mono_layers_of_a_block_use_identical_experts(megatron_world1):
    maps = routing_maps(build_variant("mono"))
    for layer in range(1, 4):
        assert torch.equal(maps[layer], maps[0])
        assert torch.equal(maps[4 + layer], maps[4])
    assert not torch.equal(maps[0], maps[4]), "blocks route independently"


def test_mono_grads_reach_the_deciding_router_from_every_layer(megatron_world1):
    model = build_variant("mono")
    owner = routers(model)[0]
    assert [r.weight is owner.weight for r in routers(model)[:4]] == [True] * 4
    # The last layer of the block alone still sends gradient to the first layer's router.
    probs = []
    handle = routers(model)[3].register_forward_hook(lambda m, i, out: probs.append(out[0]))
    tokens, positions = batch()
    model(tokens, positions, None)
    handle.remove()
    probs[0].sum().backward()
    assert owner.weight.grad is not None and owner.weight.grad.abs().sum() > 0


def test_lowrank_rank_zero_is_the_shared_router(megatron_world1):
    lowrank = build("lowrank", None, seed=3, lowrank_rank=0)
    shared = build("path", TINY["num_layers"], seed=4)
    assert lowrank.state_dict().keys() == shared.state_dict().keys()
    lowrank.load_state_dict(shared.state_dict())
    tokens, positions = batch()
    torch.testing.assert_close(lowrank(tokens, positions, None), shared(tokens, positions, None),
                               rtol=0, atol=0)
    # With rank > 0, A_l starts at zero: the same routing as the shared router at step 0.
    ranked = build("lowrank", None, seed=5, lowrank_rank=2)
    ranked.load_state_dict(shared.state_dict(), strict=False)
    assert [torch.equal(a, b) for a, b in zip(routing_maps(ranked), routing_maps(shared))] \
        == [True] * TINY["num_layers"]


def test_xmoe_temperature_stays_within_bounds(megatron_world1):
    model = build_variant("xmoe", xmoe_temperature_min=0.05, xmoe_temperature_max=0.5,
                          xmoe_temperature_init=0.1)
    router = routers(model)[0]
    assert router.temperature().item() == pytest.approx(0.1)
    for extreme in (-1e4, -30.0, 30.0, 1e4):
        with torch.no_grad():
            router.temperature_logit.fill_(extreme)
        assert 0.05 <= router.temperature().item() <= 0.5
    with torch.no_grad():
        router.temperature_logit.zero_()
    loss_of(model).backward()
    assert router.temperature_logit.grad.abs().item() > 0, "the temperature learns"


def test_xmoe_temperature_bounded_during_training(megatron_world1):
    cfg = config("xmoe", xmoe_temperature_min=0.05, xmoe_temperature_init=0.06,
                 xmoe_temperature_max=0.08)
    chunks, _, before, _ = train_steps(cfg, steps=3)
    for r in routers(chunks[0].module):
        assert 0.05 <= r.temperature().item() <= 0.08
    assert any(not torch.equal(p, before[n]) for n, p in chunks[0].module.named_parameters()
               if n.endswith("temperature_logit"))


def test_recurrent_gru_has_one_owner_and_grads_from_every_layer(megatron_world1):
    model = build_variant("recurrent")
    rs = routers(model)
    gru_names = [n for n, _ in model.named_parameters() if ".gru." in n]
    assert gru_names == [f"decoder.layers.0.mlp.router.gru.{n}"
                         for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    assert all(r.gru is rs[0].gru for r in rs)
    x = [torch.randn(6, 1, TINY["hidden_size"]) for _ in rs]
    for target in range(len(rs)):
        rs[0].gru.zero_grad()
        for r in rs:
            r.weight_in.grad = None
        logits = [r.gating(xi) for r, xi in zip(rs, x)]
        logits[target].square().sum().backward()
        # weight_hh multiplies the incoming state, zero at layer 1; the others see every layer.
        for name in ("weight_ih", "bias_ih", "bias_hh") + (("weight_hh",) if target else ()):
            grad = getattr(rs[0].gru, name).grad
            assert grad.abs().sum() > 0, f"no GRU {name} grad from layer {target + 1}"
        # The state runs over depth: earlier layers' projections get gradient, later do not.
        assert [r.weight_in.grad is not None and r.weight_in.grad.abs().sum() > 0
                for r in rs] == [layer <= target for layer in range(len(rs))]


def test_recurrent_state_left_over_from_another_batch_is_refused(megatron_world1):
    rs = routers(build_variant("recurrent"))
    rs[0].gating(torch.randn(6, 1, TINY["hidden_size"]))
    with pytest.raises(RuntimeError, match="recurrent router of layer 2"):
        rs[1].gating(torch.randn(4, 1, TINY["hidden_size"]))


# --------------------------------------------------------------------------- load balancing

def _expert_bias_model(routing: str, **extra):
    return build(routing, extra.pop("path_block_size", None), seed=11,
                 moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                 moe_router_bias_update_rate=0.5, **extra)


def test_expert_bias_and_counts_are_aggregated_per_block(megatron_world1):
    """PathMoE: one bias and one token counter per block, fed by every layer of the block,
    moved once per global batch by megatron's own update."""
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    from megatron_pathmoe.platform import clear_unhandled_cuda_calls, unhandled_cuda_calls

    model = _expert_bias_model("path", path_block_size=4)
    clear_unhandled_cuda_calls()
    per_layer = {}
    handles = [r.register_forward_hook(
        lambda m, i, out: per_layer.__setitem__(m.layer_number, out[1].sum(0).float()))
        for r in routers(model)]
    loss_of(model).backward()
    for h in handles:
        h.remove()
    assert not unhandled_cuda_calls(), "the expert-bias count must stay off CUDA code paths"
    rs = routers(model)
    for block in (0, 1):
        owner = rs[4 * block]
        block_routers = rs[4 * block:4 * block + 4]
        assert all(r.expert_bias is owner.expert_bias for r in block_routers)
        expected = sum(per_layer[r.layer_number] for r in block_routers)
        torch.testing.assert_close(owner.local_tokens_per_expert, expected)
    counts = [rs[0].local_tokens_per_expert.clone(), rs[4].local_tokens_per_expert.clone()]
    _update_router_expert_bias([model], model.config)
    for owner, count in zip((rs[0], rs[4]), counts):
        expected = 0.5 * torch.sign(count.mean() - count)  # one update of rate 0.5, not four
        torch.testing.assert_close(owner.expert_bias, expected)
    assert not torch.equal(rs[0].expert_bias, rs[4].expert_bias)
    # The tie survives a module-wide conversion that replaces buffers module by module.
    rs[1]._buffers["expert_bias"] = rs[1].expert_bias.clone()
    loss_of(model)
    assert rs[1].expert_bias is rs[0].expert_bias


def test_expert_bias_stays_per_layer_for_lowrank_and_independent(megatron_world1):
    for routing in ("lowrank", "independent"):
        rs = routers(_expert_bias_model(routing))
        assert len({id(r.expert_bias) for r in rs}) == TINY["num_layers"]


def test_expert_bias_is_checkpointed_per_layer_slot(megatron_world1):
    model = _expert_bias_model("path", path_block_size=4)
    state = model.state_dict()
    keys = [k for k in state if k.endswith("router.expert_bias")]
    assert len(keys) == TINY["num_layers"]


def test_aux_loss_log_averages_over_deciding_layers(megatron_world1):
    from megatron_pathmoe.training.metrics import pop_aux_losses

    mono = build("mono", 4, seed=2, moe_aux_loss_coeff=0.01)
    loss_of(mono).backward()
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    values = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"].clone()
    assert int((values != 0).sum()) == 2  # layers 1 and 5 decide
    logged = pop_aux_losses(TINY["num_layers"], 1)["load_balancing_loss"]
    assert logged == pytest.approx(float(values.sum()) / 2)
