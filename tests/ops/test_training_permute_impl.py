"""The training entry point with --permute-impl custom reproduces megatron-core's permutation."""

from __future__ import annotations

import json

from tests.conftest import run_cli

MODEL_ARGS = ["--device", "cpu", "--num-layers", "2", "--hidden-size", "64",
              "--num-attention-heads", "4", "--moe-ffn-hidden-size", "96", "--seq-length", "64",
              "--num-experts", "8", "--moe-router-topk", "3", "--path-block-size", "2",
              "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "4",
              "--lr", "3e-3", "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-iters", "1"]


def _train(demo_data, tmp_path, impl: str) -> tuple[dict, str]:
    summary = tmp_path / f"{impl}.json"
    result = run_cli(["-m", "megatron_pathmoe.training.pretrain", *MODEL_ARGS,
                      "--data-path", demo_data["train_prefix"],
                      "--valid-data-path", demo_data["valid_prefix"],
                      "--tokenizer-model", demo_data["tokenizer"],
                      "--permute-impl", impl, "--summary-json", str(summary)])
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads(summary.read_text()), result.stdout


def test_custom_permutation_trains_exactly_like_megatron(demo_data, tmp_path):
    """fp32 on CPU: the custom ops give megatron-core's sums bit for bit, so every loss of the
    run is identical."""
    custom, log = _train(demo_data, tmp_path, "custom")
    megatron, _ = _train(demo_data, tmp_path, "megatron")
    assert "token permutation: custom" in log
    assert len(custom["train_losses"]) == 4
    assert custom["train_losses"] == megatron["train_losses"]
    assert custom["valid_loss"] == megatron["valid_loss"]
