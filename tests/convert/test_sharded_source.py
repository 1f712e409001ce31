"""A checkpoint saved by `pathmoe-pretrain --save` under torchrun with TP2 x PP2 x EP2 (path
routing, one block spanning both pipeline stages, q/k/v biases and a gated shared expert split
over TP) exports the same Hugging Face weights two independent ways: resharded to one process
by megatron's dist_checkpointing, and converted in its own layout under torchrun (the mapping
table's TP merge, global expert and layer indices)."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_pathmoe.convert import export_to_hf
from megatron_pathmoe.convert.hf_files import read_weights
from tests.conftest import run_cli
from tests.convert.conftest import load_hf, megatron_logits, random_tokens

LAYOUT = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
          "--expert-model-parallel-size", "2"]
MODEL = ["--device", "cpu", "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads",
         "4", "--num-query-groups", "2", "--moe-ffn-hidden-size", "32", "--seq-length", "32",
         "--num-experts", "4", "--moe-router-topk", "2", "--routing", "path",
         "--path-block-size", "4", "--micro-batch-size", "2", "--global-batch-size", "4",
         "--lr-warmup-iters", "0", "--eval-iters", "1", "--train-iters", "1",
         "--moe-shared-expert-intermediate-size", "32", "--moe-shared-expert-gate",
         "--add-qkv-bias"]


def _ok(result) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


@pytest.fixture(scope="module")
def sharded_checkpoint(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    _ok(run_cli(["-m", "megatron_pathmoe.training.pretrain", *MODEL, *LAYOUT,
                 "--sequence-parallel", "--data-path", demo_data["train_prefix"],
                 "--valid-data-path", demo_data["valid_prefix"], "--tokenizer-model",
                 demo_data["tokenizer"], "--save", str(root / "ckpt")], nproc=4))
    return root


def test_sharded_checkpoint_exports_identical_weights_both_ways(megatron_world1,
                                                                sharded_checkpoint):
    from megatron_pathmoe.checkpoint import load_model_for_inference

    root = sharded_checkpoint
    resharded = export_to_hf(str(root / "ckpt"), str(root / "hf_world1"))
    _ok(run_cli(["-m", "megatron_pathmoe.convert.cli", "to-hf", "--load", str(root / "ckpt"),
                 "--output", str(root / "hf_native"), *LAYOUT], nproc=4))
    world1, native = read_weights(resharded), read_weights(str(root / "hf_native"))
    assert world1.keys() == native.keys()
    assert [k for k in world1 if not torch.equal(world1[k], native[k])] == []
    assert json.load(open(root / "hf_world1" / "config.json")) == \
        json.load(open(root / "hf_native" / "config.json"))
    assert world1["model.layers.3.mlp.shared_expert.gate_proj.weight"].shape == (32, 64)
    assert world1["model.layers.3.mlp.shared_expert_gate.weight"].shape == (1, 64)
    assert world1["model.layers.3.self_attn.k_proj.bias"].shape == (32,)  # 2 groups x 16
    gates = [world1[f"model.layers.{i}.mlp.gate.weight"] for i in range(4)]
    assert all(torch.equal(g, gates[0]) for g in gates)  # one block of 4 layers
    model, run = load_model_for_inference(str(root / "ckpt"))
    tokens = random_tokens(run.model)
    with torch.no_grad():
        diff = (load_hf(resharded)(tokens).logits - megatron_logits(model, tokens)).abs().max()
    assert diff < 1e-4
