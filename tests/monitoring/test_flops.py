"""Model FLOPs of a step: a hand count, Megatron-LM's closed form, and torch's FLOP counter
on the real model's forward and backward."""

from __future__ import annotations

import pytest
import torch

from megatron_pathmoe.config import PathMoEConfig
from megatron_pathmoe.monitoring.flops import (
    flops_per_step,
    forward_flops_per_token,
    peak_bf16_tflops,
    throughput_scalars,
)

TINY = dict(num_layers=2, hidden_size=8, num_attention_heads=2, num_query_groups=1,
            moe_ffn_hidden_size=16, seq_length=4, vocab_size=32, num_experts=4,
            moe_router_topk=2, routing="independent")


def test_hand_count_for_a_tiny_config():
    cfg = PathMoEConfig(**TINY).validate()
    # Per token and layer, forward, 2 FLOPs per multiply-add; h=8, kv=4 (one group), s=4.
    qkv_o = 2 * 8 * 8 + 2 * 2 * 8 * 4 + 2 * 8 * 8     # Q, K and V (GQA), output projection
    core = (2 * 4 * 8 + 2 * 4 * 8) // 2                # QK^T, attention x V; causal half
    experts = 2 * 3 * (2 * 8 * 16)                      # top-2 SwiGLU: gate, up, down
    router = 2 * 8 * 4
    logits = 2 * 8 * 32
    assert forward_flops_per_token(cfg) == {"attention": 2 * (qkv_o + core),
                                            "experts": 2 * experts, "router": 2 * router,
                                            "logits": logits}
    per_token = 2 * (qkv_o + core + experts + router) + logits
    assert per_token == 4608
    assert flops_per_step(cfg, global_batch_size=3) == 3 * per_token * 3 * 4


def test_equals_megatron_lm_closed_form_plus_router():
    cfg = PathMoEConfig(num_layers=6, hidden_size=96, num_attention_heads=6,
                        num_query_groups=2, moe_ffn_hidden_size=160, seq_length=64,
                        vocab_size=512, num_experts=16, moe_router_topk=3,
                        routing="independent").validate()
    h, s, n, L, f, k, V = 96, 64, 6, 6, 160, 3, 512
    gbs = 5
    megatron = gbs * s * (12 * L * h * f * k * 3 / 2
                          + 12 * L * h * h * (1 + 2 / n + s / h / 2)
                          + 6 * h * V)
    router = 3 * gbs * s * L * 2 * h * 16
    assert flops_per_step(cfg, gbs) == pytest.approx(megatron + router, rel=1e-12)


@pytest.mark.parametrize("routing,extra,router_macs", [
    ("xmoe", dict(xmoe_dim=5), 5 * (8 + 4)),
    ("recurrent", dict(recurrent_router_dim=3), 3 * 8 + 2 * 3 * 3 * 3 + 4 * 3),
    ("lowrank", dict(lowrank_rank=2), 8 * 4 + 2 * (8 + 4)),
    ("mono", dict(path_block_size=2), 8 * 4 / 2),
    ("path", dict(path_block_size=2), 8 * 4),
])
def test_router_of_each_variant(routing, extra, router_macs):
    cfg = PathMoEConfig(**{**TINY, "routing": routing, **extra}).validate()
    assert forward_flops_per_token(cfg)["router"] == 2 * 2 * router_macs


def test_torch_flop_counter_on_the_model_agrees(megatron_world1):
    """Forward + backward of the built model under torch's FlopCounterMode (matmuls only,
    like the convention) equals the count, once the masked half of the attention scores,
    which megatron's local attention does compute, is added back."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_pathmoe.model import build_gpt_model

    cfg = PathMoEConfig(**{**TINY, "hidden_size": 16, "seq_length": 8, "vocab_size": 128}
                        ).validate()
    torch.manual_seed(0)
    model = build_gpt_model(cfg)
    batch = 3
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_length))
    positions = torch.arange(cfg.seq_length).expand(batch, -1)
    with FlopCounterMode(display=False) as counter:
        model(tokens, positions, None, labels=tokens).sum().backward()
    masked = 3 * batch * cfg.seq_length * cfg.num_layers * 2 * cfg.seq_length * cfg.hidden_size
    assert counter.get_total_flops() == flops_per_step(cfg, batch) + masked


def test_peaks_and_mfu():
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA H200") == 989.4
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_bf16_tflops("cpu") is None
    scalars = throughput_scalars(8e12, 2.0, world_size=2, peak_tflops=989.4)
    assert scalars == pytest.approx({"throughput": 2.0, "mfu": 2.0 / 989.4})
    assert throughput_scalars(8e12, 2.0, 2, None) == {"throughput": 2.0}
