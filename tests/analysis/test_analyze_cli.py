"""tools/analyze_paths.py end to end: train a tiny model with --save, analyse it on one process
and on TP2 x PP2 (torchrun, gloo), and reject bad input before anything launches."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megatron_pathmoe.analysis.cli import REPORT_FILE, main
from megatron_pathmoe.analysis.path_arrays import load_paths
from megatron_pathmoe.analysis.plots import PLOT_FILES
from megatron_pathmoe.data import token_stream
from tests.conftest import run_cli

MODEL = ["--device", "cpu", "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads",
         "4", "--num-query-groups", "2", "--moe-ffn-hidden-size", "64", "--seq-length", "64",
         "--num-experts", "4", "--moe-router-topk", "2", "--routing", "path",
         "--path-block-size", "2", "--micro-batch-size", "4", "--global-batch-size", "8",
         "--train-iters", "4", "--lr-warmup-iters", "1", "--log-interval", "2",
         "--eval-iters", "1"]
TOKENS = 2048  # 32 sequences of 64


@pytest.fixture(scope="module")
def checkpoint(demo_data, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("analysis_ckpt") / "run"
    result = run_cli(["-m", "megatron_pathmoe.training.pretrain", *MODEL,
                      "--data-path", demo_data["train_prefix"],
                      "--valid-data-path", demo_data["valid_prefix"],
                      "--tokenizer-model", demo_data["tokenizer"], "--save", str(root)],
                     timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return str(root)


def _analyze(demo_data, out, checkpoints: list[str], nproc: int = 0, *layout: str) -> dict:
    args = ["tools/analyze_paths.py", *[f"--checkpoint={c}" for c in checkpoints],
            "--data", demo_data["valid_prefix"], "--tokens", str(TOKENS),
            "--output-dir", str(out), "--robustness-tokens", str(TOKENS),
            "--robustness-p", "0", "1", "--robustness-seeds", "1", *layout]
    result = run_cli(args, nproc=nproc, timeout=400)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads((out / REPORT_FILE).read_text())


@pytest.fixture(scope="module")
def single(demo_data, checkpoint, tmp_path_factory):
    """One process, the same model under two labels (its --save root and its iter folder)."""
    out = tmp_path_factory.mktemp("analysis_single")
    report = _analyze(demo_data, out, [f"root={checkpoint}",
                                       f"iter={checkpoint}/iter_0000004"])
    return out, report


def test_report_compares_models_side_by_side(demo_data, single):
    out, report = single
    models = report["models"]
    assert list(models) == ["root", "iter"]
    per_model = {label: {k: v for k, v in m.items() if k not in ("label", "checkpoint",
                                                                  "recording")}
                 for label, m in models.items()}
    assert per_model["root"] == per_model["iter"]  # one model: identical measurements
    m = models["root"]
    assert m["tokens"] == TOKENS and m["layers"] == 4 and m["experts"] == 4 and m["topk"] == 2
    assert m["iteration"] == 4 and m["routing"] == "path" and m["path_block_size"] == 2
    assert 0 < m["path_entropy"]["entropy_bits"] <= m["path_entropy"]["max_entropy_bits"] == 8
    # Robustness ran on the recorded tokens: p = 0 is exactly the recording's perplexity.
    assert m["robustness"]["base_perplexity"] == m["perplexity"]
    assert [row["p"] for row in m["robustness"]["sweep"]] == [0.0, 1.0]
    assert set(report["plots"]) == set(PLOT_FILES)
    for name in PLOT_FILES.values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    paths = load_paths(m["recording"])
    assert paths.tokens.tolist() == token_stream(demo_data["valid_prefix"])[:TOKENS].tolist()
    assert paths.positions.tolist() == list(range(64)) * (TOKENS // 64)
    assert paths.experts.shape == (4, 2, TOKENS) and paths.info["label"] == "root"


def test_tp2_pp2_records_the_same_paths(demo_data, checkpoint, single, tmp_path):
    out, report = single
    parallel = _analyze(demo_data, tmp_path, [f"root={checkpoint}"], 4,
                        "--tensor-model-parallel-size", "2",
                        "--pipeline-model-parallel-size", "2")
    reference = load_paths(report["models"]["root"]["recording"])
    paths = load_paths(parallel["models"]["root"]["recording"])
    # TP=2 routes each half of the sequence on its own rank, PP=2 holds layers 3-4 on stage 2.
    assert (paths.experts == reference.experts).all()
    np.testing.assert_allclose(paths.probs.astype(np.float32),
                               reference.probs.astype(np.float32), atol=1e-3)
    assert (paths.tokens == reference.tokens).all()
    assert parallel["models"]["root"]["perplexity"] == \
        pytest.approx(report["models"]["root"]["perplexity"], rel=1e-5)


@pytest.mark.parametrize("argv, flag", [
    (["--checkpoint", "a=/nonexistent/run"], "--checkpoint a=/nonexistent/run"),
    (["--checkpoint", "a=CKPT", "--checkpoint", "a=CKPT"], "labels ['a']"),
    (["--checkpoint", "a=CKPT", "--pipeline-model-parallel-size", "3"],
     "--pipeline-model-parallel-size 3"),
    (["--checkpoint", "a=CKPT", "--robustness-p", "1.5"], "--robustness-p"),
    (["--checkpoint", "a=CKPT", "--seq-length", "1000"], "--seq-length 1000"),
])
def test_bad_input_is_one_line_naming_the_flag(demo_data, checkpoint, tmp_path, capsys, argv,
                                               flag):
    argv = [a.replace("CKPT", checkpoint) for a in argv]
    code = main([*argv, "--data", demo_data["valid_prefix"], "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and flag in err[0], err


def test_missing_data_names_the_flag(checkpoint, tmp_path, capsys):
    missing = os.path.join(str(tmp_path), "nope_text_document")
    code = main(["--checkpoint", checkpoint, "--data", missing + ".bin",
                 "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--data" in err and "without the extension" in err
