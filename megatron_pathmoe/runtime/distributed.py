"""Process group, megatron parallel state and RNG streams for one run (any entry point)."""

from __future__ import annotations

import contextlib
import os
import socket
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_pathmoe.config import PathMoEConfig
from megatron_pathmoe.platform import resolve_device, unhandled_cuda_calls

DEFAULT_SEED = 1234
DEFAULT_TIMEOUT_MINUTES = 10


def initialize_distributed(layout: PathMoEConfig, device: str = "auto", *,
                           seed: int = DEFAULT_SEED,
                           timeout_minutes: int = DEFAULT_TIMEOUT_MINUTES) -> str:
    """Process group (nccl on GPU, gloo on CPU), megatron parallel state for ``layout``'s
    parallel sizes (nothing else of it is read), RNG streams. Resolves ``device`` (``auto``;
    ``cpu`` enables the CPU platform) and returns it. Refuses an unsupported megatron-core
    first (one line naming version and location) rather than failing deep inside it."""
    from megatron_pathmoe.platform.gpu import check_megatron_core

    check_megatron_core()
    device = resolve_device(device)
    if "RANK" not in os.environ:  # plain `python -m ...`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                timeout=timedelta(minutes=timeout_minutes))
    initialize_model_parallel(layout)
    seed_rngs(seed)
    return device


def seed_rngs(seed: int) -> None:
    """torch's and megatron's model-parallel RNG streams, as every run starts them (what
    rebuilding a run's initial weights needs)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def initialize_model_parallel(layout: PathMoEConfig) -> None:
    """megatron's parallel state for ``layout`` (experts never tensor-parallel, as in
    ``PathMoEConfig.to_transformer_config``)."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=layout.expert_model_parallel_size,
        expert_tensor_parallel_size=1,
    )


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(layout: PathMoEConfig, device: str = "auto", *,
                seed: int = DEFAULT_SEED) -> Iterator[str]:
    """:func:`initialize_distributed` for a ``with`` block (yields the device), torn down
    after it, also after a failure (else the next run sees "already initialized")."""
    try:
        yield initialize_distributed(layout, device, seed=seed)
    finally:
        destroy_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_rank0() -> bool:
    """Global rank 0, or no process group at all."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_to_cpu(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM
                      ) -> torch.Tensor:
    """A copy of ``tensor`` reduced over all ranks (on the backend's device), on the CPU."""
    reduced = tensor.clone()
    if dist.is_initialized():
        device = (torch.device("cuda", torch.cuda.current_device())
                  if dist.get_backend() == "nccl" else torch.device("cpu"))
        reduced = reduced.to(device)
        dist.all_reduce(reduced, op=op)
    return reduced.cpu()


def check_platform(device: str) -> None:
    """A CUDA call that megatron swallowed would make the CPU run differ from a GPU run."""
    calls = unhandled_cuda_calls() if device == "cpu" else []
    if calls:
        raise RuntimeError("megatron-core reached CUDA calls the CPU platform does not map:\n  "
                           + "\n  ".join(calls))
