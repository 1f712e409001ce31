"""The key table and fused layouts, on hand-made tensors (no megatron process group)."""

from __future__ import annotations

import pytest
import torch

from megatron_pathmoe.convert import ConversionError
from megatron_pathmoe.convert.hf_files import parse_size
from megatron_pathmoe.convert.mapping import GATE_UP, QKV, AttentionDims, match_megatron_key
from megatron_pathmoe.convert.shards import Piece, merge_pieces
from tests.convert.conftest import tiny_config

HIDDEN = 8


def _rows(tag: float, n: int) -> torch.Tensor:
    """n rows, each filled with (tag + row index / 100), so a row's origin can be read back."""
    return (tag + torch.arange(n, dtype=torch.float32) / 100)[:, None].expand(n, HIDDEN).clone()


def test_qkv_split_follows_megatrons_per_group_layout():
    # 2 query groups x 2 heads per group, head_dim 3: megatron stores per group [q q k v].
    dims = AttentionDims(heads_per_group=2, head_dim=3)
    blocks = {(g, part): _rows(10 * g + part, 3) for g in range(2) for part in range(4)}
    fused = torch.cat([blocks[(g, part)] for g in range(2) for part in range(4)])
    q, k, v = QKV.split(fused, dims)
    # Query heads in order (group 0: heads 0, 1; group 1: heads 2, 3), then k/v per group.
    assert torch.equal(q, torch.cat([blocks[(0, 0)], blocks[(0, 1)], blocks[(1, 0)],
                                     blocks[(1, 1)]]))
    assert torch.equal(k, torch.cat([blocks[(0, 2)], blocks[(1, 2)]]))
    assert torch.equal(v, torch.cat([blocks[(0, 3)], blocks[(1, 3)]]))
    assert torch.equal(QKV.merge((q, k, v), dims), fused)


def test_tensor_parallel_shards_merge_per_fused_part():
    """TP2: each rank holds its own query groups in the fused layout, and its own halves of
    gate and up; merging concatenates part by part."""
    cfg = tiny_config(routing="independent", num_layers=1, hidden_size=HIDDEN,
                      num_attention_heads=4, num_query_groups=2, moe_ffn_hidden_size=4)
    dims = AttentionDims(heads_per_group=2, head_dim=2)
    qkv = torch.randn(2 * 4 * 2, HIDDEN)  # 2 groups x (2 q + k + v) heads x head_dim 2
    gate, up = torch.randn(4, HIDDEN), torch.randn(4, HIDDEN)
    proj = torch.randn(HIDDEN, HIDDEN)
    pieces = []
    for rank in range(2):
        pieces += [
            Piece("decoder.layers.0.self_attention.linear_qkv.weight", rank, 2,
                  qkv.chunk(2)[rank]),
            Piece("decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight", rank, 2,
                  GATE_UP.merge((gate.chunk(2)[rank], up.chunk(2)[rank]), dims)),
            Piece("decoder.layers.0.self_attention.linear_proj.weight", rank, 2,
                  proj.chunk(2, dim=1)[rank]),
            Piece("decoder.final_layernorm.weight", rank, 2, torch.ones(HIDDEN)),
        ]
    merged = merge_pieces(pieces, cfg)
    assert torch.equal(merged["decoder.layers.0.self_attention.linear_qkv.weight"], qkv)
    assert torch.equal(merged["decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight"],
                       torch.cat([gate, up]))
    assert torch.equal(merged["decoder.layers.0.self_attention.linear_proj.weight"], proj)
    assert torch.equal(merged["decoder.final_layernorm.weight"], torch.ones(HIDDEN))


def test_diverging_replicas_are_refused():
    cfg = tiny_config(routing="independent")
    key = "decoder.final_layernorm.weight"
    with pytest.raises(ConversionError, match="replicas of decoder.final_layernorm.weight"):
        merge_pieces([Piece(key, 0, 1, torch.ones(4)), Piece(key, 0, 1, torch.zeros(4))], cfg)


def test_wildcards_give_global_indices_and_unknown_keys_are_named():
    row, idx = match_megatron_key("decoder.layers.12.mlp.experts.local_experts.7.linear_fc2.weight")
    assert idx == {"layer": 12, "expert": 7} and row.tp_dim == 1 and row.expert_parallel
    assert row.hf_keys(**idx) == ("model.layers.12.mlp.experts.7.down_proj.weight",)
    row, idx = match_megatron_key("decoder.layers.3.mlp.shared_experts.linear_fc1.weight")
    assert row.requires == "shared_expert" and row.tp_dim == 0 and not row.expert_parallel
    assert row.hf_keys(**idx) == ("model.layers.3.mlp.shared_expert.gate_proj.weight",
                                  "model.layers.3.mlp.shared_expert.up_proj.weight")
    with pytest.raises(ConversionError, match="no Hugging Face mapping.*linear_fc1"):
        match_megatron_key("decoder.layers.0.mlp.linear_fc1.weight")  # a dense MLP: none here


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20),
                                        ("1234", 1234), ("0.5 kb", 500)])
def test_shard_sizes(text, size):
    assert parse_size(text) == size
