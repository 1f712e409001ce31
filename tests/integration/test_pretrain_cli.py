"""The pretraining entry point as users run it: it learns, and bad input fails early and clearly."""

from __future__ import annotations

import json
import math

import pytest

from megatron_pathmoe.data import load_tokenizer, unigram_cross_entropy
from tests.conftest import run_cli

MODEL_ARGS = ["--device", "cpu", "--num-layers", "4", "--hidden-size", "64",
              "--num-attention-heads", "4", "--moe-ffn-hidden-size", "128", "--seq-length", "128",
              "--num-experts", "8", "--moe-router-topk", "2"]


def _data_args(demo_data) -> list[str]:
    return ["--data-path", demo_data["train_prefix"], "--valid-data-path",
            demo_data["valid_prefix"], "--tokenizer-model", demo_data["tokenizer"]]


def test_tiny_pathmoe_beats_unigram_baseline(demo_data, tmp_path):
    summary_path = tmp_path / "summary.json"
    result = run_cli(["-m", "megatron_pathmoe.training.pretrain", *MODEL_ARGS,
                      *_data_args(demo_data), "--routing", "path", "--path-block-size", "2",
                      "--micro-batch-size", "8", "--global-batch-size", "16",
                      "--train-iters", "80", "--lr", "3e-3", "--lr-warmup-iters", "8",
                      "--log-interval", "20", "--eval-iters", "8",
                      "--summary-json", str(summary_path)])
    assert result.returncode == 0, result.stderr[-5000:]
    summary = json.loads(summary_path.read_text())
    vocab = load_tokenizer(demo_data["tokenizer"]).vocab_size
    unigram = unigram_cross_entropy(demo_data["train_prefix"], vocab,
                                    eval_tokens=demo_data["valid_prefix"])
    assert math.log(vocab) > unigram > 3.0
    assert summary["valid_loss"] < unigram - 0.1, (summary["valid_loss"], unigram)
    assert summary["valid_perplexity"] == pytest.approx(math.exp(summary["valid_loss"]))
    # The log carries what users watch: loss, aux loss, tokens/s and per-layer expert load.
    assert "tokens/s" in result.stdout and "expert load max/min" in result.stdout
    assert "L4 " in result.stdout and summary["parameters"]["router"] == 2 * 8 * 64


def _bad(args: list[str]) -> str:
    result = run_cli(["-m", "megatron_pathmoe.training.pretrain", *args], timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "init_process_group" not in result.stderr and "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_missing_data_path_names_flag_and_fix(demo_data, tmp_path):
    args = [*MODEL_ARGS, "--data-path", str(tmp_path / "nope_text_document"),
            "--tokenizer-model", demo_data["tokenizer"]]
    line = _bad(args)
    assert "--data-path" in line and "nope_text_document" in line and "preprocess_data" in line


def test_wrong_tokenizer_path_names_flag(demo_data, tmp_path):
    args = [*MODEL_ARGS, "--data-path", demo_data["train_prefix"],
            "--tokenizer-model", str(tmp_path / "missing.json")]
    line = _bad(args)
    assert "--tokenizer-model" in line and "missing.json" in line


@pytest.mark.parametrize("override, flag", [
    (["--path-block-size", "3"], "--path-block-size"),
    (["--moe-router-topk", "9"], "--moe-router-topk"),
    (["--num-experts", "6", "--expert-model-parallel-size", "4"], "--expert-model-parallel-size"),
    (["--global-batch-size", "10", "--micro-batch-size", "4"], "--global-batch-size"),
])
def test_config_that_does_not_fit_fails_before_launch(demo_data, override, flag):
    line = _bad([*MODEL_ARGS, *_data_args(demo_data), "--routing", "path", *override])
    assert flag in line
