"""Checkpoints through the training CLI: exact resume, interrupted saves, resharding, faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_pathmoe.checkpoint import (
    TRACKER_FILE,
    CheckpointError,
    read_run_config,
    resolve_checkpoint_dir,
)
from tests.conftest import REPO, free_port, run_cli

MODEL = ["--device", "cpu", "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads",
         "4", "--num-query-groups", "2", "--moe-ffn-hidden-size", "64", "--seq-length", "64",
         "--num-experts", "4", "--moe-router-topk", "2", "--micro-batch-size", "2",
         "--global-batch-size", "8", "--lr-warmup-iters", "1", "--log-interval", "1",
         "--eval-iters", "2", "--moe-aux-loss-coeff", "0.01"]
ITERS = 6


def _data(demo_data) -> list[str]:
    return ["--data-path", demo_data["train_prefix"], "--valid-data-path",
            demo_data["valid_prefix"], "--tokenizer-model", demo_data["tokenizer"]]


def _train(demo_data, summary, *extra, nproc: int = 0, env: dict | None = None,
           expect_ok: bool = True) -> subprocess.CompletedProcess:
    args = ["-m", "megatron_pathmoe.training.pretrain", *MODEL, *_data(demo_data),
            "--summary-json", str(summary), *extra]
    if env:
        os.environ.update(env)
    try:
        result = run_cli(args, nproc=nproc, timeout=300)
    finally:
        for key in env or {}:
            os.environ.pop(key)
    if expect_ok:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _summary(path) -> dict:
    return json.loads(open(path).read())


@pytest.fixture(scope="module")
def reference(demo_data, tmp_path_factory):
    """World-1 run of ITERS iterations, checkpointing every 2: the uninterrupted reference."""
    root = tmp_path_factory.mktemp("reference")
    _train(demo_data, root / "summary.json", "--train-iters", str(ITERS), "--save",
           str(root / "ckpt"), "--save-interval", "2", "--routing", "independent")
    return {"ckpt": root / "ckpt", "summary": _summary(root / "summary.json")}


def test_resume_is_bitwise_exact_world1(demo_data, reference, tmp_path):
    _train(demo_data, tmp_path / "s.json", "--train-iters", str(ITERS), "--routing",
           "independent", "--load", str(reference["ckpt"] / "iter_0000002"))
    resumed = _summary(tmp_path / "s.json")
    assert resumed["start_iteration"] == 2 and resumed["consumed_samples"] == ITERS * 8
    assert resumed["train_losses"] == reference["summary"]["train_losses"][2:]
    assert resumed["grad_norms"] == reference["summary"]["grad_norms"][2:]
    assert resumed["valid_loss"] == reference["summary"]["valid_loss"]


def test_resume_may_turn_on_recompute_and_capacity(demo_data, reference, tmp_path):
    """A requeued job may change performance switches (recompute is exact) and token dropping;
    the weights, optimizer and data position carry over."""
    _train(demo_data, tmp_path / "s.json", "--train-iters", str(ITERS), "--routing",
           "independent", "--recompute-granularity", "full", "--recompute-method", "uniform",
           "--recompute-num-layers", "1", "--load", str(reference["ckpt"] / "iter_0000002"))
    assert _summary(tmp_path / "s.json")["train_losses"] == \
        reference["summary"]["train_losses"][2:]
    _train(demo_data, tmp_path / "c.json", "--train-iters", "3", "--routing", "independent",
           "--moe-expert-capacity-factor", "1.0", "--load",
           str(reference["ckpt"] / "iter_0000002"))
    assert _summary(tmp_path / "c.json")["start_iteration"] == 2


def test_resume_is_bitwise_exact_world2_distributed_optimizer(demo_data, tmp_path):
    extra = ["--routing", "path", "--path-block-size", "2", "--use-distributed-optimizer",
             "--train-iters", "4"]
    full, part = tmp_path / "full.json", tmp_path / "part.json"
    _train(demo_data, full, "--save", str(tmp_path / "ck"), "--save-interval", "1",
           "--keep-last", "2", *extra, nproc=2)
    assert sorted(os.listdir(tmp_path / "ck")) == ["iter_0000003", "iter_0000004", TRACKER_FILE,
                                                   "metrics.jsonl"]  # --save is the run dir
    _train(demo_data, part, "--load", str(tmp_path / "ck" / "iter_0000003"), *extra, nproc=2)
    assert _summary(part)["train_losses"] == _summary(full)["train_losses"][3:]


def _kill_when(demo_data, tmp_path, marker: str, env: dict) -> str:
    """Start training in its own process group, SIGKILL the whole group once ``marker`` is
    printed; returns the output seen."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
           "-m", "megatron_pathmoe.training.pretrain", *MODEL, *_data(demo_data),
           "--train-iters", str(ITERS), "--routing", "independent", "--save",
           str(tmp_path / "ckpt"), "--save-interval", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", **env))
    seen = []
    deadline = time.time() + 240
    for line in proc.stdout:
        seen.append(line)
        if marker in line or time.time() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert any(marker in line for line in seen), "".join(seen[-30:])
    return "".join(seen)


@pytest.mark.parametrize("marker, env", [
    ("saving checkpoint at iteration 4", {"PATHMOE_FAULT_INJECT": "slow_save=60"}),
    ("iter      3/6", {}),
], ids=["during-save", "between-saves"])
def test_sigkill_leaves_newest_complete_checkpoint(demo_data, reference, tmp_path, marker, env):
    _kill_when(demo_data, tmp_path, marker, env)
    ckpt = tmp_path / "ckpt"
    assert resolve_checkpoint_dir(str(ckpt)) == str(ckpt / "iter_0000002")
    if env:  # the interrupted save left its shards under a temporary name, never picked
        assert (ckpt / ".tmp_iter_0000004").is_dir() and not (ckpt / "iter_0000004").exists()
    _train(demo_data, tmp_path / "s.json", "--train-iters", str(ITERS), "--routing",
           "independent", "--save", str(ckpt), "--save-interval", "2", "--load", str(ckpt))
    assert _summary(tmp_path / "s.json")["train_losses"] == \
        reference["summary"]["train_losses"][2:]
    assert not (ckpt / ".tmp_iter_0000004").exists()
    assert resolve_checkpoint_dir(str(ckpt)) == str(ckpt / f"iter_{ITERS:07d}")


def test_dying_rank_ends_the_job_and_names_the_rank(demo_data, tmp_path):
    t0 = time.time()
    result = _train(demo_data, tmp_path / "s.json", "--train-iters", "4", "--routing",
                    "independent", nproc=2, expect_ok=False,
                    env={"PATHMOE_FAULT_INJECT": "fail_at=2:rank=1"})
    assert result.returncode != 0
    assert time.time() - t0 < 120
    assert "rank 1" in result.stderr and "injected failure" in result.stderr


def test_nonfinite_loss_stop_names_iteration_and_layer(demo_data, tmp_path):
    result = _train(demo_data, tmp_path / "s.json", "--train-iters", "4", "--routing",
                    "independent", "--save", str(tmp_path / "ck"), "--save-interval", "1",
                    expect_ok=False, env={"PATHMOE_FAULT_INJECT": "nan_at=3:layer=2"})
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert "iteration 3" in line and "MoE layer 2" in line and "NonFiniteError" in line
    # The last good state stays the newest checkpoint.
    assert resolve_checkpoint_dir(str(tmp_path / "ck")).endswith("iter_0000002")


def test_nonfinite_loss_skip_keeps_training(demo_data, tmp_path):
    _train(demo_data, tmp_path / "s.json", "--train-iters", "4", "--routing", "independent",
           "--nonfinite-action", "skip", env={"PATHMOE_FAULT_INJECT": "nan_at=2:layer=1"})
    summary = _summary(tmp_path / "s.json")
    assert summary["skipped_iterations"] == [2]
    losses = summary["train_losses"]
    assert losses[1] != losses[1]  # NaN at the poisoned step
    assert all(abs(x) < 20 for i, x in enumerate(losses) if i != 1)
    assert summary["valid_loss"] == summary["valid_loss"]  # the weights stayed finite


@pytest.mark.parametrize("override, field", [
    (["--num-experts", "8"], "num_experts"),
    (["--routing", "path", "--path-block-size", "2"], "routing"),
    (["--hidden-size", "32"], "hidden_size"),
])
def test_resume_into_a_different_model_is_refused(demo_data, reference, tmp_path, override,
                                                   field):
    args = ["-m", "megatron_pathmoe.training.pretrain", *MODEL, *_data(demo_data),
            "--train-iters", str(ITERS), "--routing", "independent", *override,
            "--load", str(reference["ckpt"])]
    result = run_cli(args, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert field in result.stderr and "--load" in result.stderr


def test_resume_with_a_different_tokenizer_is_refused(demo_data, reference, tmp_path):
    other = tmp_path / "tokenizer.json"
    other.write_text(open(demo_data["tokenizer"]).read().replace('"<|endoftext|>"',
                                                                 '"<|endoftext|>" '))
    args = ["-m", "megatron_pathmoe.training.pretrain", *MODEL, "--data-path",
            demo_data["train_prefix"], "--tokenizer-model", str(other), "--train-iters", "6",
            "--routing", "independent", "--load", str(reference["ckpt"])]
    result = run_cli(args, timeout=120)
    assert result.returncode == 2 and "--tokenizer-model" in result.stderr


def test_checkpoint_directory_resolution(reference, tmp_path):
    ckpt = reference["ckpt"]
    assert resolve_checkpoint_dir(str(ckpt)).endswith(f"iter_{ITERS:07d}")
    run = read_run_config(str(ckpt))
    assert run.iteration == ITERS and run.model.routing == "independent"
    assert os.path.isfile(run.tokenizer_path) and run.has_optimizer
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint_dir(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint_dir(str(tmp_path))
    (tmp_path / TRACKER_FILE).write_text("seven\n")
    with pytest.raises(CheckpointError, match="expected an iteration number"):
        resolve_checkpoint_dir(str(tmp_path))
    (tmp_path / TRACKER_FILE).write_text("7\n")
    with pytest.raises(CheckpointError, match="missing or incomplete"):
        resolve_checkpoint_dir(str(tmp_path))
    (tmp_path / "iter_0000009").mkdir()
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        resolve_checkpoint_dir(str(tmp_path / "iter_0000009"))


LAYOUTS = {
    "TP2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "EP2": ["--expert-model-parallel-size", "2"],
    "PP2": ["--pipeline-model-parallel-size", "2"],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_checkpoint_reshards_between_layouts(demo_data, reference, tmp_path, layout):
    """World 1 -> layout and layout -> world 1: the loaded weights give the same validation
    loss (a forward pass over the same batches; zero training steps after loading)."""
    into = tmp_path / "into.json"
    _train(demo_data, into, "--train-iters", str(ITERS), "--routing", "independent",
           "--load", str(reference["ckpt"]), *LAYOUTS[layout], nproc=2)
    assert _summary(into)["train_losses"] == []
    # TP/EP reduce in a different order than one process: equal to float32 rounding.
    assert _summary(into)["valid_loss"] == pytest.approx(reference["summary"]["valid_loss"],
                                                         rel=1e-5)
    saved, back = tmp_path / "saved.json", tmp_path / "back.json"
    _train(demo_data, saved, "--train-iters", "2", "--routing", "independent", "--save",
           str(tmp_path / "ck"), *LAYOUTS[layout], nproc=2)
    _train(demo_data, back, "--train-iters", "2", "--routing", "independent", "--load",
           str(tmp_path / "ck"))
    assert _summary(back)["valid_loss"] == pytest.approx(_summary(saved)["valid_loss"],
                                                         rel=1e-5)



def test_block_spanning_pipeline_stages_is_stored_once_and_reshards(demo_data, tmp_path):
    """PathB4 over 4 layers at PP2: the block's router lives on both stages but is one
    checkpoint entry, which loads into one process with the same validation loss."""
    from megatron.core.dist_checkpointing.serialization import load_tensors_metadata

    path = ["--routing", "path", "--path-block-size", "4", "--train-iters", "2"]
    saved, back = tmp_path / "saved.json", tmp_path / "back.json"
    _train(demo_data, saved, *path, "--save", str(tmp_path / "ck"),
           "--pipeline-model-parallel-size", "2", nproc=2)
    keys = set(load_tensors_metadata(resolve_checkpoint_dir(str(tmp_path / "ck"))))
    assert "pathmoe_ties.path.block0.weight" in keys
    assert not any(k.startswith("decoder.layers.mlp.router") for k in keys)
    _train(demo_data, back, *path, "--load", str(tmp_path / "ck"))
    assert _summary(back)["valid_loss"] == pytest.approx(_summary(saved)["valid_loss"], rel=1e-5)
