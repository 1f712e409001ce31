"""--moe-router-dtype and --moe-router-load-balancing-type reach megatron-core's router in
every routing variant, with megatron-core's meaning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_pathmoe.config import ConfigError, PathMoEConfig
from tests.training.test_moe_capacity import SHAPE, VARIANTS
from tests.unit.test_block_shared_router import batch

COEFF = 1e-2
TRACKER_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
                 "global_aux_loss": "global_load_balancing_loss"}


def _build(name: str, **extra):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_pathmoe.model import build_gpt_model

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    model = build_gpt_model(PathMoEConfig(**{**SHAPE, **VARIANTS[name], **extra}).validate())
    model.train()
    return model


def _record_logits(model) -> dict[int, torch.Tensor]:
    """Layer number -> the logits its router's top-k (megatron's ``routing``) received."""
    logits: dict[int, torch.Tensor] = {}
    for layer in model.decoder.layers:
        router = layer.mlp.router

        def routing(x, padding_mask=None, _router=router, _inner=router.routing):
            logits[_router.layer_number] = x.detach().clone()
            return _inner(x, padding_mask=padding_mask)

        router.routing = routing
    return logits


def _loss(model) -> torch.Tensor:
    tokens, positions = batch()
    return model(tokens, positions, None, labels=tokens).mean()


def _tracked(name: str) -> torch.Tensor | None:
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    entry = get_moe_layer_wise_logging_tracker().get(name)
    return None if entry is None else entry["values"].clone()


def _switch_loss(logits: torch.Tensor, topk: int, tokens_per_expert=None) -> torch.Tensor:
    """megatron's switch loss over ``logits`` [tokens, experts] by hand (softmax scores):
    E / (k T^2) * sum_i (sum of scores to i) * (tokens routed to i)."""
    scores = torch.softmax(logits.float(), dim=-1)
    tokens, experts = scores.shape
    if tokens_per_expert is None:
        chosen = scores.topk(topk, dim=-1).indices
        tokens_per_expert = torch.zeros(experts).index_add_(0, chosen.flatten(),
                                                            torch.ones(chosen.numel()))
    return (scores.sum(0) * tokens_per_expert).sum() * experts / (topk * tokens ** 2)


def _expected(kind: str, logits: torch.Tensor, topk: int) -> torch.Tensor:
    seq, bsz, experts = logits.shape
    if kind == "seq_aux_loss":  # per sequence, averaged over the batch
        return torch.stack([_switch_loss(logits[:, b], topk) for b in range(bsz)]).mean()
    return _switch_loss(logits.reshape(-1, experts), topk)  # aux_loss; global's first step


@pytest.mark.parametrize("kind", list(TRACKER_NAMES))
@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_load_balancing_type_is_megatrons_formula(megatron_world1, name, kind):
    model = _build(name, moe_aux_loss_coeff=COEFF, moe_router_load_balancing_type=kind)
    logits = _record_logits(model)
    _loss(model)
    tracked = _tracked(TRACKER_NAMES[kind])
    assert tracked is not None
    # Every layer that decides logs its loss (mono: the first layer of each block only).
    assert sorted(logits) == [i + 1 for i in range(SHAPE["num_layers"]) if tracked[i] != 0]
    assert all(n not in TRACKER_NAMES.values() or n == TRACKER_NAMES[kind]
               for n in _tracker_names())
    for layer, layer_logits in logits.items():
        expected = _expected(kind, layer_logits, SHAPE["moe_router_topk"])
        torch.testing.assert_close(tracked[layer - 1], expected, rtol=1e-5, atol=0)


def test_global_aux_loss_accumulates_tokens_over_micro_batches(megatron_world1):
    """global_aux_loss counts tokens over the global batch (megatron resets the count in
    finalize_model_grads): the second micro-batch's loss uses the mean of both counts."""
    model = _build("path", moe_aux_loss_coeff=COEFF,
                   moe_router_load_balancing_type="global_aux_loss")
    logits = _record_logits(model)
    _loss(model)
    first = {layer: x.reshape(-1, x.shape[-1]) for layer, x in logits.items()}
    before = _tracked("global_load_balancing_loss")
    torch.manual_seed(1)
    model.embedding.word_embeddings.weight.data.add_(0.5 * torch.randn_like(
        model.embedding.word_embeddings.weight))  # a different second micro-batch
    _loss(model)
    second = _tracked("global_load_balancing_loss") - before
    for layer, x in logits.items():
        x = x.reshape(-1, x.shape[-1])
        counts = [_counts(y) for y in (first[layer], x)]
        expected = _switch_loss(x, SHAPE["moe_router_topk"], (counts[0] + counts[1]) / 2)
        torch.testing.assert_close(second[layer - 1], expected, rtol=1e-5, atol=0)
        assert not torch.isclose(expected, _switch_loss(x, SHAPE["moe_router_topk"]))


def _counts(logits: torch.Tensor) -> torch.Tensor:
    chosen = torch.softmax(logits.float(), -1).topk(SHAPE["moe_router_topk"], dim=-1).indices
    return torch.zeros(logits.shape[-1]).index_add_(0, chosen.flatten(),
                                                    torch.ones(chosen.numel()))


def _tracker_names() -> list[str]:
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    return [n for n, v in get_moe_layer_wise_logging_tracker().items() if v["values"].any()]


def test_none_disables_the_aux_loss(megatron_world1):
    """'none' with a positive coefficient: nothing logged, gradients as with coefficient 0;
    and the coefficient alone (type left at its default) is today's aux_loss shorthand."""
    grads = {}
    for label, extra in (("none", dict(moe_aux_loss_coeff=COEFF,
                                       moe_router_load_balancing_type="none")),
                         ("zero", dict(moe_aux_loss_coeff=0.0)),
                         ("aux", dict(moe_aux_loss_coeff=COEFF))):
        model = _build("path", **extra)
        _loss(model).backward()
        grads[label] = {n: p.grad.clone() for n, p in model.named_parameters()
                        if p.grad is not None}
        if label == "none":
            assert not _tracker_names()
    for n, g in grads["zero"].items():
        assert torch.equal(grads["none"][n], g), n
    router = [n for n in grads["aux"] if ".router." in n]
    assert router and any(not torch.equal(grads["aux"][n], grads["zero"][n]) for n in router)
    assert PathMoEConfig(moe_aux_loss_coeff=COEFF).to_transformer_config() \
        .moe_router_load_balancing_type == "aux_loss"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_router_dtype_reaches_every_variant(megatron_world1, name):
    """fp64 routing math: the logits megatron's top-k sees are fp64, and the model computes
    what the fp32 router computes up to rounding (same decisions here)."""
    results = {}
    for dtype in ("fp32", "fp64"):
        model = _build(name, moe_router_dtype=dtype, moe_aux_loss_coeff=COEFF)
        logits = _record_logits(model)
        results[dtype] = (_loss(model).detach(), logits)
        want = torch.float64 if dtype == "fp64" else torch.float32
        assert {x.dtype for x in logits.values()} == {want}
    (loss32, logits32), (loss64, logits64) = results["fp32"], results["fp64"]
    torch.testing.assert_close(loss64, loss32, rtol=1e-5, atol=0)
    for layer, x in logits32.items():
        torch.testing.assert_close(logits64[layer].float(), x, rtol=1e-4, atol=1e-5)


def test_router_option_flags_parse_and_refuse():
    from megatron_pathmoe.training.arguments import parse_args

    model, _ = parse_args(["--dry-run", "--dry-run-vocab-size", "128", "--moe-router-dtype",
                           "fp64", "--moe-router-load-balancing-type", "seq_aux_loss",
                           "--moe-aux-loss-coeff", "0.01"])
    tc = model.to_transformer_config()
    assert (tc.moe_router_dtype, tc.moe_router_load_balancing_type,
            tc.moe_aux_loss_coeff) == ("fp64", "seq_aux_loss", 0.01)
    for field, value in (("moe_router_dtype", "bf16"),
                         ("moe_router_load_balancing_type", "sinkhorn_v2")):
        with pytest.raises(ConfigError, match=field.replace("_", "-")):
            PathMoEConfig(**{field: value}).validate()


@pytest.mark.parametrize("flag", ["--moe-grouped-gemm", "--moe-permute-fusion"])
def test_te_kernels_refused_without_transformer_engine(flag, capsys):
    from megatron_pathmoe.platform.gpu import transformer_engine_importable
    from megatron_pathmoe.training.arguments import parse_args

    if transformer_engine_importable():
        pytest.skip("transformer-engine imports on this machine: the flag is allowed")
    with pytest.raises(SystemExit):
        parse_args(["--dry-run", "--dry-run-vocab-size", "128", flag])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0] and "transformer-engine" in err[0]


def test_fp64_router_trains_with_either_permutation(megatron_world1):
    """fp64 gate probabilities meet fp32 tokens in the permutation: this project's kernels and
    megatron-core's permute train alike (dropping and padding to capacity on)."""
    from tests.training.test_moe_capacity import _config, _train

    cfg = _config("path", moe_router_dtype="fp64", moe_expert_capacity_factor=0.5,
                  moe_pad_expert_input_to_capacity=True)
    custom, megatron = _train(cfg, "custom"), _train(cfg, "megatron")
    assert custom[0] == megatron[0] and custom[0][-1] < custom[0][0]


def _record_decisions(model) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Layer number -> (probs, routing_map) its router returned."""
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in model.decoder.layers:
        layer.mlp.router.register_forward_hook(
            lambda router, _, output: out.__setitem__(router.layer_number,
                                                      tuple(x.detach() for x in output)))
    return out


@pytest.mark.parametrize("topk", [1, 2])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_sinkhorn_routes_like_megatron_core(megatron_world1, name, topk):
    """--moe-router-load-balancing-type sinkhorn (S-BASE) in every variant: training picks the
    top-k of the Sinkhorn-balanced scores, gates with softmax (sigmoid at top-1) of the logits
    unrenormalised; evaluation picks the top-k of those gates; no aux loss is logged."""
    from megatron.core.transformer.moe.moe_utils import sinkhorn

    def gate(x):
        return torch.sigmoid(x) if topk == 1 else torch.softmax(x.float(), dim=-1)

    model = _build(name, moe_router_load_balancing_type="sinkhorn", moe_router_topk=topk,
                   moe_router_pre_softmax=False)
    def top(scores):
        return torch.zeros_like(scores, dtype=torch.bool).scatter(
            1, scores.topk(topk, dim=1).indices, True)

    for training in (True, False):
        model.train(training)
        logits, decisions = _record_logits(model), _record_decisions(model)
        with torch.set_grad_enabled(training):
            assert torch.isfinite(_loss(model))
        assert logits and not _tracker_names()
        rebalanced = 0
        for layer, x in logits.items():
            x = x.reshape(-1, x.shape[-1])
            expected = top(sinkhorn(x.float()) if training else gate(x))
            probs, routing_map = decisions[layer]
            assert torch.equal(routing_map, expected), (layer, training)
            torch.testing.assert_close(probs, gate(x) * expected, rtol=1e-6, atol=0)
            rebalanced += int(not torch.equal(expected, top(gate(x))))
        assert bool(rebalanced) == training  # Sinkhorn changed some choices while training
        for layer in model.decoder.layers:
            layer.mlp.router._forward_hooks.clear()
            del layer.mlp.router.routing  # the instance attribute _record_logits set


def test_sinkhorn_refuses_what_it_would_ignore(tmp_path):
    base = dict(moe_router_load_balancing_type="sinkhorn")
    PathMoEConfig(**base, moe_router_topk=1, moe_router_pre_softmax=False).validate()
    paths = tmp_path / "paths.npy"
    np.save(paths, np.zeros((2, PathMoEConfig().num_layers), dtype=np.int32))
    for extra, match in ((dict(moe_aux_loss_coeff=0.01), "aux-loss-coeff"),
                         (dict(moe_router_score_function="sigmoid"), "score-function"),
                         (dict(moe_path_restriction=str(paths)), "path-restriction")):
        with pytest.raises(ConfigError, match=f"sinkhorn.*{match}"):
            PathMoEConfig(**base, **extra).validate()


def test_resume_refuses_switching_to_or_from_sinkhorn():
    from megatron_pathmoe.checkpoint import CheckpointError
    from megatron_pathmoe.checkpoint.record import check_compatible

    aux, sinkhorn = PathMoEConfig(), PathMoEConfig(moe_router_load_balancing_type="sinkhorn")
    check_compatible(aux, PathMoEConfig(moe_router_load_balancing_type="seq_aux_loss"), "ckpt")
    for saved, now in ((aux, sinkhorn), (sinkhorn, aux)):
        with pytest.raises(CheckpointError, match="sinkhorn routing scores tokens differently"):
            check_compatible(saved, now, "ckpt")


def _group_limited_by_hand(logits: torch.Tensor, topk: int, groups: int,
                           group_topk: int) -> torch.Tensor:
    """DeepSeek-V2/V3 group-limited routing, token by token: a group scores the sum of its
    top (topk / group_topk) softmax scores; the token's top-k come from its best groups."""
    scores = torch.softmax(logits.float(), dim=-1)
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    per_group = scores.shape[1] // groups
    for t, row in enumerate(scores):
        by_group = row.view(groups, per_group)
        best = by_group.topk(topk // group_topk, dim=1).values.sum(1).topk(group_topk).indices
        allowed = torch.zeros(groups, dtype=torch.bool)
        allowed[best] = True
        masked = torch.where(allowed.repeat_interleave(per_group), row, torch.tensor(-1.0))
        chosen[t, masked.topk(topk).indices] = True
    return chosen


@pytest.mark.parametrize("name", list(VARIANTS))
def test_scaling_and_group_limited_routing_in_every_variant(megatron_world1, name):
    """--moe-router-num-groups 4 --moe-router-group-topk 1 --moe-router-topk-scaling-factor 2.5
    (top-2 of 8 experts): every decision keeps to one group of 2 experts, chosen as by hand,
    and the gates are 2.5 x the pre-softmax scores."""
    topk, groups, group_topk, factor = 2, 4, 1, 2.5
    model = _build(name, num_experts=8, moe_router_num_groups=groups,
                   moe_router_group_topk=group_topk,
                   moe_router_topk_scaling_factor=factor)
    logits, decisions = _record_logits(model), _record_decisions(model)
    _loss(model)
    assert logits
    limited = 0
    for layer, x in logits.items():
        x = x.reshape(-1, x.shape[-1])
        probs, routing_map = decisions[layer]
        expected = _group_limited_by_hand(x, topk, groups, group_topk)
        assert torch.equal(routing_map, expected), layer
        used_groups = routing_map.view(len(x), groups, -1).any(-1).sum(-1)
        assert int(used_groups.max()) == group_topk
        torch.testing.assert_close(probs, factor * torch.softmax(x.float(), -1) * expected,
                                   rtol=1e-6, atol=0)
        plain = torch.zeros_like(expected).scatter(1, x.topk(topk, dim=1).indices, True)
        limited += int(not torch.equal(plain, expected))
    assert limited  # the group limit changed some choices


@pytest.mark.parametrize("extra, needle", [
    (dict(moe_router_num_groups=4), "needs --moe-router-group-topk"),
    (dict(moe_router_group_topk=1), "needs --moe-router-num-groups"),
    (dict(moe_router_num_groups=3, moe_router_group_topk=1), "must divide --num-experts"),
    (dict(moe_router_num_groups=4, moe_router_group_topk=5), "--moe-router-group-topk 5"),
    (dict(moe_router_num_groups=8, moe_router_group_topk=1), "hold --moe-router-topk 2"),
    (dict(moe_router_topk_scaling_factor=0.0), "must be > 0"),
    (dict(moe_router_topk_scaling_factor=2.0, moe_router_load_balancing_type="sinkhorn"),
     "sinkhorn ignores --moe-router-topk-scaling-factor"),
])
def test_bad_group_and_scaling_flags_fail_in_one_line(extra, needle):
    with pytest.raises(ConfigError) as err:
        PathMoEConfig(num_experts=8, moe_router_topk=2, **extra).validate()
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_group_and_scaling_flags_reach_megatron_and_block_export():
    from megatron_pathmoe.convert.errors import ConversionError
    from megatron_pathmoe.convert.qwen2_moe import check_exportable
    from megatron_pathmoe.training.arguments import parse_args

    argv = ["--dry-run", "--dry-run-vocab-size", "128", "--num-experts", "8"]
    model, _ = parse_args(argv + ["--moe-router-num-groups", "4", "--moe-router-group-topk",
                                  "2", "--moe-router-topk-scaling-factor", "2.5"])
    tc = model.to_transformer_config()
    assert (tc.moe_router_num_groups, tc.moe_router_group_topk,
            tc.moe_router_topk_scaling_factor) == (4, 2, 2.5)
    for extra, flag in ((["--moe-router-topk-scaling-factor", "2"],
                         "--moe-router-topk-scaling-factor"),
                        (["--moe-router-num-groups", "4", "--moe-router-group-topk", "2"],
                         "--moe-router-group-topk")):
        with pytest.raises(ConversionError, match=flag):
            check_exportable(parse_args(argv + extra)[0])
    check_exportable(parse_args(argv)[0])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_force_load_balancing_routes_on_random_logits(megatron_world1, name):
    """--moe-router-force-load-balancing (megatron-core's benchmarking aid) in every variant:
    the top-k sees fresh standard-normal logits at every forward of the same batch, not the
    router's (which are the same each time and far smaller at initialisation)."""
    model = _build(name, moe_router_force_load_balancing=True, num_experts=8)
    logits = _record_logits(model)
    assert torch.isfinite(_loss(model))
    first = {layer: x.clone() for layer, x in logits.items()}
    _loss(model)
    assert first
    for layer, x in logits.items():
        x = x.reshape(-1, x.shape[-1]).float()
        assert abs(float(x.mean())) < 0.15 and abs(float(x.std()) - 1) < 0.15
        assert not torch.equal(first[layer], logits[layer])
    from megatron_pathmoe.convert.errors import ConversionError
    from megatron_pathmoe.convert.qwen2_moe import check_exportable

    with pytest.raises(ConversionError, match="force-load-balancing"):
        check_exportable(PathMoEConfig(moe_router_force_load_balancing=True).validate())
