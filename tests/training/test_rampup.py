"""--rampup-batch-size START INCREMENT SAMPLES: megatron-core's ramp-up sizes, Megatron-LM's
iteration count, and training that follows them: the ramp's first steps equal a fixed run at
START, and a run stopped and resumed mid-ramp equals the uninterrupted one."""

from __future__ import annotations

import json

import pytest

from megatron_pathmoe.config import ConfigError
from megatron_pathmoe.training.rampup import BatchRampup, GlobalBatchSchedule
from tests.conftest import run_cli
from tests.distributed.test_parallel_layouts import GRAD_NORM_RTOL, LOSS_RTOL

MODEL = ["-m", "megatron_pathmoe.training.pretrain", "--device", "cpu", "--num-layers", "2",
         "--hidden-size", "32", "--num-attention-heads", "4", "--moe-ffn-hidden-size", "32",
         "--seq-length", "32", "--num-experts", "4", "--routing", "path", "--path-block-size",
         "2", "--micro-batch-size", "2", "--log-interval", "1", "--eval-iters", "1",
         "--lr-warmup-samples", "8", "--train-samples", "48"]
RAMP = ["--global-batch-size", "8", "--rampup-batch-size", "4", "2", "16"]


def test_sizes_and_iterations_by_hand():
    """START 4, INCREMENT 4, 200 samples to 16: 66.7 samples per size; Megatron-LM
    counts the ramp's steps while at most 200 samples are consumed, then whole batches."""
    schedule = GlobalBatchSchedule(16, BatchRampup(4, 4, 200))
    assert schedule.sizes() == [4, 8, 12, 16]
    steps, consumed = [], 0
    for _ in range(34):
        steps.append(schedule.size(consumed))
        consumed += steps[-1]
    # 16 from 200 consumed on: 200 / (200 / 3) is 3.0 in floating point, as megatron-core
    # computes it.
    assert steps == [4] * 17 + [8] * 9 + [12] * 5 + [16] * 3  # 68, 140, 200 consumed
    assert schedule.iterations(1000) == 32 + (1000 - 216) // 16
    assert schedule.samples(32) == 216 and schedule.samples(2, consumed=216) == 32
    assert GlobalBatchSchedule(16).iterations(1000) == 62


@pytest.mark.parametrize("values, needle", [
    ((16, 4, 100), "START must be below --global-batch-size 16"),
    ((4, 5, 100), "INCREMENT divide the difference (12)"),
    ((0, 4, 100), "START and INCREMENT must be >= 1"),
])
def test_bad_ramps_are_one_line_errors(values, needle):
    with pytest.raises(ConfigError) as err:
        GlobalBatchSchedule(16, BatchRampup(*values))
    assert needle in str(err.value) and "\n" not in str(err.value)


def _train(demo_data, tmp_path, name: str, extra: list[str],
           nproc: int = 0) -> tuple[dict, str]:
    summary = tmp_path / f"{name}.json"
    result = run_cli([*MODEL, "--data-path", demo_data["train_prefix"], "--valid-data-path",
                      demo_data["valid_prefix"], "--tokenizer-model", demo_data["tokenizer"],
                      "--summary-json", str(summary), *extra], nproc=nproc, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(summary.read_text()), result.stdout + result.stderr


def test_training_follows_the_ramp_and_resumes_within_it(demo_data, tmp_path):
    """4, 4, 6, 6 sequences (8 samples per size over 16), then 8: 7 iterations for 48
    samples (20 in the ramp, 3 x 8 after). The first two steps are those of a fixed batch of 4
    (same data, same LR per sample); a run that exits after step 3 and resumes is bitwise the
    uninterrupted one."""
    ramp, out = _train(demo_data, tmp_path, "ramp", RAMP)
    assert len(ramp["train_losses"]) == 7 and ramp["consumed_samples"] == 44
    for size, iteration in ((4, 1), (6, 3), (8, 5)):
        assert f"global batch size {size} from iteration {iteration} " in out
    fixed, _ = _train(demo_data, tmp_path, "fixed", ["--global-batch-size", "4"])
    assert ramp["train_losses"][:2] == fixed["train_losses"][:2]
    assert ramp["train_losses"][2] != fixed["train_losses"][2]
    ckpt = str(tmp_path / "ckpt")
    first, _ = _train(demo_data, tmp_path, "first", [*RAMP, "--save", ckpt, "--exit-interval",
                                                     "3"])
    assert first["consumed_samples"] == 14 and "exit-interval" in first["exit_reason"]
    resumed, out = _train(demo_data, tmp_path, "resumed", [*RAMP, "--save", ckpt, "--load",
                                                           ckpt])
    assert "global batch size 6 from iteration 4 " in out
    assert first["train_losses"] + resumed["train_losses"] == ramp["train_losses"]
    assert resumed["valid_loss"] == ramp["valid_loss"]


def test_data_parallel_ramp_matches_one_process(demo_data, tmp_path):
    """DP2 (global batches 4, 8, then 12: whole micro-batches of 2 on each rank): the same
    losses and grad norms as one process."""
    ramp = ["--global-batch-size", "12", "--rampup-batch-size", "4", "4", "16"]
    one, _ = _train(demo_data, tmp_path, "dp1", ramp)
    two, _ = _train(demo_data, tmp_path, "dp2", ramp, nproc=2)
    assert len(one["train_losses"]) == len(two["train_losses"]) > 3
    assert two["consumed_samples"] == one["consumed_samples"]
    assert two["train_losses"] == pytest.approx(one["train_losses"], rel=LOSS_RTOL)
    assert two["grad_norms"] == pytest.approx(one["grad_norms"], rel=GRAD_NORM_RTOL)
