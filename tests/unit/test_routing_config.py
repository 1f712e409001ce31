"""Routing flags: variant defaults, and every refusal names the flag and the fix."""

from __future__ import annotations

import pytest

from megatron_pathmoe.config import ROUTING_CHOICES, ConfigError, PathMoEConfig

SHAPE = dict(num_layers=8, hidden_size=32, num_attention_heads=4, num_experts=4)


def test_block_size_defaults_per_variant():
    expected = {"path": 4, "mono": 4, "xmoe": 1, "independent": 1, "random": 1,
                "recurrent": 1, "lowrank": 1}
    for routing, block in expected.items():
        cfg = PathMoEConfig(**SHAPE, routing=routing)
        assert cfg.block_size == block
        assert cfg.validate().path_block_size == block  # recorded explicitly
    assert PathMoEConfig(**SHAPE, routing="xmoe", path_block_size=4).validate().block_size == 4


@pytest.mark.parametrize("block", [1, 2, 4, 8, 12, 24])
def test_paper_block_sizes_on_24_layers(block):
    cfg = PathMoEConfig(**{**SHAPE, "num_layers": 24}, routing="path", path_block_size=block)
    assert cfg.validate().block_size == block


@pytest.mark.parametrize("overrides,message", [
    (dict(routing="independent", path_block_size=4), "--routing independent has no router "
                                                     "blocks"),
    (dict(routing="path", path_block_size=3), "does not divide --num-layers 8"),
    (dict(routing="recurrent", pipeline_model_parallel_size=2),
     "--routing recurrent needs --pipeline-model-parallel-size 1"),
    (dict(routing="mono", path_block_size=8, pipeline_model_parallel_size=2),
     "a block would span pipeline stages of 4 layers"),
    (dict(routing="path", moe_router_enable_expert_bias=True),
     "needs --moe-router-score-function sigmoid"),
    (dict(routing="path", path_block_size=8, pipeline_model_parallel_size=2,
          moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True),
     "block spans pipeline stages of 4 layers, and its shared expert bias"),
    (dict(routing="path", moe_router_topk=1, moe_router_pre_softmax=False),
     "needs --moe-router-pre-softmax"),
    (dict(routing="lowrank", lowrank_rank=5), r"min\(--num-experts, --hidden-size\) = 4"),
    (dict(routing="xmoe", xmoe_temperature_init=2.0), "X-MoE temperature"),
    (dict(routing="xmoe", xmoe_dim=0), "--xmoe-dim must be at least 1"),
    (dict(routing="path", moe_z_loss_coeff=-1.0), "--moe-z-loss-coeff must be >= 0"),
    (dict(routing="path", moe_router_score_function="relu"), "--moe-router-score-function"),
])
def test_bad_routing_flags_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        PathMoEConfig(**SHAPE, **overrides).validate()


def test_mono_blocks_inside_pipeline_stages_are_fine():
    PathMoEConfig(**SHAPE, routing="mono", path_block_size=4,
                  pipeline_model_parallel_size=2).validate()


def test_cli_help_describes_every_variant():
    from megatron_pathmoe.training.arguments import build_parser

    text = build_parser().format_help()
    for routing, paper in zip(ROUTING_CHOICES, ("Indep-MoE", "PathB{B}-MoE", "Rand-MoE", "X-MoE",
                                                "Recurrent-MoE", "MonoB{B}-MoE",
                                                "LowRank-MoE")):
        assert f"{routing} = {paper}" in " ".join(text.split())
    assert "PathB{B}X-MoE" in text
