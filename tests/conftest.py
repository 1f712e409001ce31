"""Shared fixtures: a one-process megatron world on the CPU platform, and the demo data."""

from __future__ import annotations

import os
import socket
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def megatron_world1():
    """torch.distributed (gloo, world 1) + megatron parallel state, torn down at the end."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_pathmoe.platform import (
        cpu_platform_enabled,
        disable_cpu_platform,
        enable_cpu_platform,
    )

    was_enabled = cpu_platform_enabled()
    enable_cpu_platform(force=True)  # these tests run on CPU also on a CUDA machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        parallel_state.initialize_model_parallel()
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1234)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
        if not was_enabled:  # leave a platform enabled before us as it was
            disable_cpu_platform()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The shipped Shakespeare corpus preprocessed once per test session."""
    from megatron_pathmoe.data import prepare_demo_data

    return prepare_demo_data(str(tmp_path_factory.mktemp("demo_data")))


def run_cli(args: list[str], nproc: int = 0, timeout: int = 600, **kwargs):
    """Run a module with python (nproc=0) or torchrun --standalone (nproc>=1)."""
    import subprocess

    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"] + args
    else:
        cmd = [sys.executable] + args
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO, **kwargs)


@pytest.fixture(autouse=True)
def reset_megatron_moe_globals():
    """megatron keeps the aux-loss backward scale and the aux-loss tracker at class/module level;
    a test that backpropagates outside the schedules would leak them into the next test."""
    yield
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    get_moe_layer_wise_logging_tracker().clear()
