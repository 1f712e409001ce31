"""The expert-drift diagnosis (megatron_pathmoe.study.expert_drift) against a run it can be
checked on: after two steps at a negligible learning rate every expert is still at the initial
weights the tool rebuilds from the run's seed, and another seed's initialisation is unrelated."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_pathmoe.study.expert_drift import UNTRAINED_COSINE, summarize
from tests.conftest import run_cli

SEED = 7
SHAPE = ["--device", "cpu", "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads",
         "2", "--num-query-groups", "1", "--moe-ffn-hidden-size", "32", "--seq-length", "64",
         "--num-experts", "4", "--moe-router-topk", "2", "--routing", "path",
         "--path-block-size", "2"]


@pytest.fixture(scope="module")
def barely_trained_run(demo_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("drift") / "path2_seed7"
    result = run_cli(["-m", "megatron_pathmoe.training.pretrain", *SHAPE,
                      "--data-path", demo_data["train_prefix"],
                      "--tokenizer-model", demo_data["tokenizer"], "--micro-batch-size", "4",
                      "--global-batch-size", "4", "--train-iters", "2", "--lr", "1e-9",
                      "--min-lr", "1e-9", "--lr-warmup-iters", "0", "--seed", str(SEED), "--eval-interval", "0", "--eval-iters", "1",
                      "--save", str(run / "checkpoints"), "--save-interval", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def _drift(run, tmp_path, *extra: str) -> dict:
    out = tmp_path / "drift.json"
    result = run_cli(["-m", "megatron_pathmoe.study.expert_drift", str(run), *extra,
                      "--output", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_initial_weights_are_rebuilt_from_the_seed(barely_trained_run, tmp_path):
    report = _drift(barely_trained_run, tmp_path)  # seed read from the folder name
    (checkpoint,) = report["runs"]["path2_seed7"]["checkpoints"].values()
    cosine = np.array(checkpoint["cosine_to_init"])
    assert cosine.shape == (4, 4) and cosine.min() > 0.9999
    assert checkpoint["summary"]["untrained"] == 16
    assert checkpoint["held_out_load"] is None  # no analysis next to this run


def test_another_seed_is_unrelated(barely_trained_run, tmp_path):
    report = _drift(barely_trained_run, tmp_path, "--seed", str(SEED + 1))
    (checkpoint,) = report["runs"]["path2_seed7"]["checkpoints"].values()
    assert np.abs(np.array(checkpoint["cosine_to_init"])).max() < 0.3
    assert checkpoint["summary"]["untrained"] == 0


def test_summary_by_hand():
    cosine = np.array([[0.995, 0.40], [0.50, 0.999]])
    load = np.array([[0.0, 1.0], [0.96, 0.04]])  # shares of uniform: 0, 2 / 1.92, 0.08
    s = summarize(cosine, load)
    assert s["untrained"] == 2 and s["idle"] == 2 and s["unused"] == 1
    assert s["idle_and_untrained"] == 2
    assert s["cosine_mean_idle"] == pytest.approx(0.997)
    assert s["cosine_mean_busy"] == pytest.approx(0.45)
    assert summarize(cosine, None) == {"experts": 4, "untrained": 2, "cosine_max": 0.999,
                                       "cosine_mean": pytest.approx(0.7235)}
    assert 0.995 > UNTRAINED_COSINE


def test_a_folder_without_checkpoints_is_refused(tmp_path):
    result = run_cli(["-m", "megatron_pathmoe.study.expert_drift", str(tmp_path / "x_seed1"),
                      "--output", str(tmp_path / "o.json")])
    assert result.returncode == 2 and "no checkpoints/ folder" in result.stderr


def test_run_names_split_into_variant_and_seed():
    from megatron_pathmoe.study.runner import run_name, split_run_name
    from megatron_pathmoe.study.variants import ABLATIONS, VARIANTS

    assert split_run_name(run_name({**VARIANTS, **ABLATIONS}["path4_aux"], 3)) == ("path4_aux", 3)
    assert split_run_name("path4_seed") is None and split_run_name("corpus") is None
