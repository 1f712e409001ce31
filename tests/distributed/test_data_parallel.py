"""Data parallelism over gloo reproduces the single-process run of the same global batch."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

TINY_ARGS = ["--device", "cpu", "--num-layers", "4", "--hidden-size", "64",
             "--num-attention-heads", "4", "--num-query-groups", "2", "--moe-ffn-hidden-size",
             "64", "--seq-length", "64", "--num-experts", "4", "--moe-router-topk", "2",
             "--routing", "path", "--path-block-size", "2", "--micro-batch-size", "2",
             "--global-batch-size", "8", "--train-iters", "4", "--lr-warmup-iters", "1",
             "--log-interval", "2", "--eval-iters", "1", "--moe-aux-loss-coeff", "0.01"]


def _train(demo_data, tmp_path, nproc: int, extra: list[str]) -> dict:
    summary = tmp_path / f"summary_{nproc}_{'_'.join(extra) or 'base'}.json"
    result = run_cli(["-m", "megatron_pathmoe.training.pretrain", *TINY_ARGS,
                      "--data-path", demo_data["train_prefix"],
                      "--valid-data-path", demo_data["valid_prefix"],
                      "--tokenizer-model", demo_data["tokenizer"],
                      "--summary-json", str(summary), *extra], nproc=nproc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads(summary.read_text())


@pytest.mark.parametrize("extra", [[], ["--use-distributed-optimizer",
                                        "--moe-token-dispatcher-type", "allgather"]],
                         ids=["ddp-alltoall", "distopt-allgather"])
def test_dp2_matches_single_process(demo_data, tmp_path, extra):
    single = _train(demo_data, tmp_path, 1, extra)
    dp2 = _train(demo_data, tmp_path, 2, extra)
    assert len(single["train_losses"]) == 4
    # Same samples, same init; only the order of floating-point sums differs.
    for a, b in zip(single["train_losses"], dp2["train_losses"]):
        assert a == pytest.approx(b, rel=1e-5)
    for a, b in zip(single["grad_norms"], dp2["grad_norms"]):
        assert a > 0 and a == pytest.approx(b, rel=1e-4)
    assert single["valid_loss"] == pytest.approx(dp2["valid_loss"], rel=1e-5)
    # The run must actually learn, not merely agree.
    assert single["train_losses"][-1] < single["train_losses"][0]
