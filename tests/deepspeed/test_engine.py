"""DeepSpeed's engine over gloo (torchrun): EP2 vs EP1, ZeRO-1/2 vs no ZeRO, save/stop/resume.

Every run trains the same 4-layer model on the same global batches (drop-free top-2, aux loss
off, so the loss does not depend on how tokens are split over ranks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from tests.conftest import REPO, free_port, run_cli

TRAIN = "megatron_pathmoe.integrations.deepspeed.train"
MODEL = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
         "--moe-ffn-hidden-size", "96", "--num-experts", "4", "--moe-router-topk", "2",
         "--seq-length", "64", "--global-batch-size", "4", "--train-iters", "4", "--log-interval", "1",
         "--eval-iters", "1"]
# name: (world size, extra flags); world 2 runs EP2 with micro-batch 2, world 1 EP1 with 4.
RUNS = {
    "ep1_indep": (1, ["--routing", "independent", "--zero-stage", "0"]),
    "ep2_indep": (2, ["--routing", "independent", "--zero-stage", "0"]),
    "ep1_b2": (1, ["--path-block-size", "2", "--zero-stage", "0"]),
    "ep2_b2": (2, ["--path-block-size", "2", "--zero-stage", "0"]),
    "ep2_b2_zero1": (2, ["--path-block-size", "2", "--zero-stage", "1"]),
    "ep2_b2_zero2": (2, ["--path-block-size", "2", "--zero-stage", "2"]),
}


def run_flags(world: int, demo_data: dict) -> list[str]:
    return ["--micro-batch-size", str(4 // world), "--expert-model-parallel-size", str(world),
            "--data-path", demo_data["train_prefix"], "--valid-data-path", demo_data["valid_prefix"],
            "--tokenizer-model", demo_data["tokenizer"]]


@pytest.fixture(scope="module")
def train(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds_runs")
    done: dict[str, dict] = {}

    def run(name: str, world: int, flags: list[str]) -> dict:
        if name not in done:
            log = out / f"{name}.json"
            proc = run_cli(["-m", TRAIN, *MODEL, *run_flags(world, demo_data), *flags, "--log-json", str(log)],
                           nproc=world)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            done[name] = json.loads(log.read_text())
        return done[name]

    run.out = out
    return run


def losses(result: dict) -> list[float]:
    """Training losses per iteration, then the validation loss when there is one."""
    return [h["lm_loss"] for h in result["history"]] + [result[k] for k in ("valid_loss",) if k in result]


@pytest.mark.parametrize("routing", ["indep", "b2"])
def test_ep2_reproduces_ep1(train, routing):
    ep1 = train(f"ep1_{routing}", *RUNS[f"ep1_{routing}"])
    ep2 = train(f"ep2_{routing}", *RUNS[f"ep2_{routing}"])
    assert len(losses(ep1)) == 5
    torch.testing.assert_close(losses(ep2), losses(ep1), rtol=1e-6, atol=0)
    assert ep1["history"][-1]["lm_loss"] < ep1["history"][0]["lm_loss"]  # it trained
    expected_owner = [0, 1, 2, 3] if routing == "indep" else [0, 0, 2, 2]
    assert ep1["gate_owner"] == ep2["gate_owner"] == expected_owner


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_matches_no_zero_and_counts_shared_gate_once(train, stage):
    plain = train("ep2_b2", *RUNS["ep2_b2"])
    zero = train(f"ep2_b2_zero{stage}", *RUNS[f"ep2_b2_zero{stage}"])
    torch.testing.assert_close(losses(zero), losses(plain), rtol=1e-6, atol=0)
    for result in (plain, zero):
        assert result["shared_gates"] == ["path.block0.weight", "path.block1.weight"]
        assert result["optimizer_numel"] == result["model_numel"]
        assert result["gate_owner"] == [0, 0, 2, 2]


def test_bf16_trains_with_the_gate_tied(train):
    """bf16 is meant for GPUs; DeepSpeed's CPU accelerator runs it too, so it is checked here."""
    fp32 = train("ep1_b2", *RUNS["ep1_b2"])
    bf16 = train("ep1_b2_bf16", 1, [*RUNS["ep1_b2"][1], "--bf16"])
    torch.testing.assert_close(losses(bf16), losses(fp32), rtol=1e-2, atol=0)
    assert losses(bf16) != losses(fp32)  # bf16 was in effect
    assert bf16["gate_owner"] == [0, 0, 2, 2]
    assert bf16["optimizer_numel"] == bf16["model_numel"]


def test_deepspeed_launcher_gives_the_torchrun_losses(train, demo_data):
    torchrun = train("ep2_b2", *RUNS["ep2_b2"])
    log = train.out / "launcher.json"
    proc = run_cli(["-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
                    "--module", TRAIN, *MODEL, *run_flags(2, demo_data), *RUNS["ep2_b2"][1],
                    "--log-json", str(log)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert losses(json.loads(log.read_text())) == losses(torchrun)


def kill_after(args: list[str], iteration: int, timeout: float = 600) -> list[str]:
    """Run torchrun with ``args`` and SIGKILL it and its workers once ``iteration`` is logged
    (the workers are looked up as children: torchrun may start them in their own sessions)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", *args]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=REPO)
    lines, deadline = [], time.monotonic() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(f"iteration {iteration:5d} ") or time.monotonic() > deadline:
                break
    finally:
        procs = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
        for p in procs:  # workers first, then the agent
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=60)
        proc.wait()
    assert any(l.startswith(f"iteration {iteration:5d} ") for l in lines), "".join(lines[-40:])
    return lines


def test_save_kill_resume_is_bitwise_and_gate_stays_tied(train, demo_data):
    full = train("ep2_b2_zero2", *RUNS["ep2_b2_zero2"])
    ckpt = str(train.out / "ckpt")
    flags = RUNS["ep2_b2_zero2"][1]
    # checkpoint at iteration 2, killed during iteration 4 (after 3 was logged)
    kill_after(["-m", TRAIN, *MODEL, *run_flags(2, demo_data), *flags, "--save", ckpt,
                "--save-interval", "2"], iteration=3)
    with open(os.path.join(ckpt, "latest"), encoding="utf-8") as f:
        assert f.read() == "iter_0000002"
    resumed = train("resume", 2, [*flags, "--load", ckpt])
    assert not os.path.exists(os.path.join(ckpt, "iter_0000004"))  # the killed job stayed dead
    assert losses(full)[2:] == losses(resumed)  # bitwise
    assert [h["iteration"] for h in resumed["history"]] == [3, 4]
    assert resumed["gate_owner"] == [0, 0, 2, 2]
    assert resumed["optimizer_numel"] == resumed["model_numel"]
    state = torch.load(os.path.join(ckpt, "iter_0000002", "mp_rank_00_model_states.pt"),
                       map_location="cpu", weights_only=False)["module"]
    assert [k for k in state if ".gate." in k] == ["layers.0.moe.deepspeed_moe.gate.wg.weight",
                                                  "layers.2.moe.deepspeed_moe.gate.wg.weight"]
