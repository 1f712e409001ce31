"""Tiny pathmoe-pretrain runs for the cluster-operation tests: one command line, launched
through torchrun in its own session so a test can signal or kill it mid-run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

from tests.conftest import REPO, free_port

MODEL = ["--device", "cpu", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads",
         "4", "--num-query-groups", "2", "--moe-ffn-hidden-size", "32", "--seq-length", "32",
         "--num-experts", "4", "--moe-router-topk", "2", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--lr-warmup-iters", "1", "--log-interval", "1",
         "--eval-iters", "2", "--routing", "path", "--path-block-size", "2"]


def data_args(demo_data) -> list[str]:
    return ["--data-path", demo_data["train_prefix"], "--valid-data-path",
            demo_data["valid_prefix"], "--tokenizer-model", demo_data["tokenizer"]]


def launch(args: list[str], nproc: int = 1) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
           "-m", "megatron_pathmoe.training.pretrain", *MODEL, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"))


def run(args: list[str], nproc: int = 1, timeout: float = 300) -> str:
    """Run to the end; returns the output (asserts exit status 0)."""
    proc = launch(args, nproc)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def read_until(proc: subprocess.Popen, pattern: str, timeout: float = 240) -> list[str]:
    """The output lines up to and including the first one matching ``pattern``."""
    seen, deadline = [], time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if re.search(pattern, line) or time.time() > deadline:
            break
    assert re.search(pattern, seen[-1] if seen else ""), "".join(seen[-30:])
    return seen


def worker_pids(proc: subprocess.Popen) -> dict[int, int]:
    """torchrun's worker processes by global rank."""
    import psutil

    workers = {}
    for child in psutil.Process(proc.pid).children():  # not the workers' checkpoint writers
        rank = child.environ().get("RANK")
        if rank is not None:
            workers[int(rank)] = child.pid
    return workers


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (they run in sessions of their own), as a node failure
    or an expired allocation would."""
    import psutil

    workers = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for worker in workers:
        try:
            worker.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(workers, timeout=60)


def summary(path) -> dict:
    return json.loads(open(path).read())
