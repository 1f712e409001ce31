"""Run megatron-core's own CUDA-only code paths on CPU over gloo.

Megatron-core 0.16.1 hard-codes CUDA in ~250 places (``torch.cuda.current_device()`` as an
allocation device, ``device="cuda"``, ``.cuda()``, streams, events, RNG trackers). Instead of
forking megatron we make those calls mean "the CPU" while the platform is enabled:

* a ``TorchFunctionMode`` rewrites every ``device=`` that names CUDA to ``cpu``, makes
  ``Tensor.cuda()`` the identity and reports CPU float tensors with their CUDA type name (the
  optimizer asserts ``param.type() == 'torch.cuda.FloatTensor'``);
* ``torch.cuda`` streams, events and synchronisation become no-ops, its RNG functions act on
  the CPU generator (so megatron's RNG tracker forks real, distinct streams per TP rank);
* three megatron call sites that no device mapping can fix get targeted patches;
* ``torch.distributed`` AVG reductions, which gloo lacks, become SUM + divide.

Everything else that still reaches the CUDA runtime lands in ``torch.cuda._lazy_init``, which
the platform replaces with a trap: it records the call site and raises
:class:`UnhandledCudaCallError`, so a megatron upgrade that adds a new CUDA call fails loudly
(and the guard test fails) instead of silently doing something else.

The platform is never enabled when CUDA is available unless forced, and ``disable()`` restores
every patched attribute, so a GPU process is untouched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")


class UnhandledCudaCallError(RuntimeError):
    """A CUDA runtime call that the CPU platform does not map reached ``torch.cuda``."""


@dataclass
class _Patch:
    owner: Any
    name: str
    original: Any
    existed: bool


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int device means "the current accelerator", i.e. CUDA in megatron's code.
    return isinstance(device, int) and not isinstance(device, bool)


def _to_cpu_device(device: Any) -> Any:
    return _CPU if _is_cuda_device(device) else device


class CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA placement requests of any torch call to the CPU."""

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return _cuda_type_name(args[0])
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


def _cuda_type_name(tensor: torch.Tensor) -> str:
    name = torch._C._TensorBase.type(tensor)
    return name.replace("torch.", "torch.cuda.", 1) if tensor.device.type == "cpu" else name


class _NullStream:
    """Stands in for ``torch.cuda.Stream``/``Event``: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __eq__(self, other):
        return isinstance(other, _NullStream)

    def __hash__(self):
        return 0

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


def _noop() -> Callable:
    # A fresh function per patched name: torch._dynamo's trace rules reject one object
    # standing for several torch functions.
    def noop(*args, **kwargs):
        return None

    return noop


def _null_context() -> Callable:
    @contextlib.contextmanager
    def null_context(*args, **kwargs):
        yield

    return null_context


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _get_cpu_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(state)


def _maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
    """megatron's version converts split sizes to numpy only for CUDA tensors; gloo's
    ``all_to_all_single`` needs lists/arrays for CPU tensors too."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.cpu().numpy()
    return tensor


_UNHANDLED: list[str] = []


def _caller_site() -> str:
    """The innermost frame outside torch itself: the code that asked for CUDA."""
    torch_dir = os.path.dirname(torch.__file__)
    for frame in reversed(traceback.extract_stack()[:-2]):
        if not frame.filename.startswith(torch_dir) and frame.filename != __file__:
            return f"{frame.filename}:{frame.lineno} ({frame.name}): {frame.line}"
    return "<unknown>"


def _trap_lazy_init(*args, **kwargs) -> None:
    site = _caller_site()
    _UNHANDLED.append(site)
    raise UnhandledCudaCallError(
        f"unhandled CUDA call on the CPU platform at {site}; "
        "map it in megatron_pathmoe/platform/cpu.py (or run on a CUDA machine)"
    )


def _gloo_safe_collective(original: Callable, tensor_arg: int) -> Callable:
    """gloo has no ReduceOp.AVG: reduce with SUM, then divide by the group size."""

    def collective(*args, **kwargs):
        op = kwargs.get("op")
        if op != dist.ReduceOp.AVG:
            return original(*args, **kwargs)
        kwargs["op"] = dist.ReduceOp.SUM
        if kwargs.get("async_op"):
            raise UnhandledCudaCallError("async AVG reduction is not supported over gloo")
        result = original(*args, **kwargs)
        group = kwargs.get("group")
        args[tensor_arg].div_(dist.get_world_size(group))
        return result

    collective.__wrapped__ = original
    return collective


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class CpuPlatform:
    """Owns every patch; ``enable()``/``disable()`` are idempotent and symmetric."""

    def __init__(self) -> None:
        self._patches: list[_Patch] = []
        self._mode: CudaToCpuMode | None = None

    @property
    def enabled(self) -> bool:
        return self._mode is not None

    def _set(self, owner: Any, name: str, value: Any) -> None:
        existed = hasattr(owner, name)
        self._patches.append(_Patch(owner, name, getattr(owner, name, None), existed))
        setattr(owner, name, value)

    def enable(self) -> None:
        if self.enabled:
            return
        import megatron.core  # noqa: F401  (import, and torch._dynamo with it, before patching)

        self._patch_torch_cuda()
        self._patch_distributed()
        self._patch_megatron()
        self._mode = CudaToCpuMode()
        self._mode.__enter__()

    def disable(self) -> None:
        if not self.enabled:
            return
        self._mode.__exit__(None, None, None)
        self._mode = None
        from megatron.core.tensor_parallel import random as mcore_random

        logging.getLogger(mcore_random.__name__).removeFilter(self._rng_filter)
        for patch in reversed(self._patches):
            if patch.existed:
                setattr(patch.owner, patch.name, patch.original)
            else:
                delattr(patch.owner, patch.name)
        self._patches.clear()

    def _patch_torch_cuda(self) -> None:
        cuda = torch.cuda
        for name in ("Stream", "Event", "ExternalStream"):
            self._set(cuda, name, _NullStream)
        for name in ("current_stream", "default_stream"):
            self._set(cuda, name, lambda *a, **k: _NullStream())
        for name in ("stream", "device", "use_mem_pool"):
            self._set(cuda, name, _null_context())
        for name in ("synchronize", "set_device", "empty_cache", "set_stream",
                     "reset_peak_memory_stats", "manual_seed_all"):
            self._set(cuda, name, _noop())
        # A CPU device, not the int 0: backward passes run outside the function mode (a mode
        # is popped while it handles Tensor.backward), and megatron's autograd functions
        # allocate with device=torch.cuda.current_device() there.
        self._set(cuda, "current_device", lambda: _CPU)
        for name in ("memory_allocated", "max_memory_allocated", "memory_reserved",
                     "max_memory_reserved"):
            self._set(cuda, name, lambda *a, **k: 0)
        self._set(cuda, "manual_seed", _cpu_manual_seed)
        self._set(cuda, "get_rng_state", _get_cpu_rng_state)
        self._set(cuda, "set_rng_state", _set_cpu_rng_state)
        self._set(cuda.nvtx, "range_push", _noop())
        self._set(cuda.nvtx, "range_pop", _noop())
        self._set(cuda.nvtx, "range", _null_context())
        self._set(cuda, "_lazy_init", _trap_lazy_init)

    def _patch_distributed(self) -> None:
        self._set(dist, "all_reduce", _gloo_safe_collective(dist.all_reduce, 0))
        self._set(dist, "reduce_scatter_tensor",
                  _gloo_safe_collective(dist.reduce_scatter_tensor, 0))

    def _patch_megatron(self) -> None:
        from megatron.core.tensor_parallel import random as mcore_random
        from megatron.core.transformer.moe import moe_utils, token_dispatcher

        self._set(mcore_random, "_get_cuda_rng_state", _get_cpu_rng_state)
        self._set(mcore_random, "_set_cuda_rng_state", _set_cpu_rng_state)
        # 0.16.1 references te_general_gemm without defining it when transformer-engine
        # is absent (NameError in router gating).
        if not hasattr(moe_utils, "te_general_gemm"):
            self._set(moe_utils, "te_general_gemm", None)
        self._set(token_dispatcher, "maybe_move_tensor_to_cpu", _maybe_move_tensor_to_cpu)
        # Activation recomputation runs forward code (literal device="cuda" included) inside
        # backward, where the function mode is off: run it with a mode of its own.
        for function in (mcore_random.CheckpointFunction,
                         mcore_random.CheckpointWithoutOutputFunction):
            self._set(function, "backward", staticmethod(_with_mode(function.backward)))
        # The RNG tracker warns when the CPU generator moves inside fork(); on this platform
        # the "CUDA" generator *is* the CPU one, so the warning is always spurious.
        self._rng_filter = _DropMessage("CPU RNG state changed within GPU RNG context")
        logging.getLogger(mcore_random.__name__).addFilter(self._rng_filter)


def _with_mode(backward: Callable) -> Callable:
    def run(ctx, *grads):
        with CudaToCpuMode():
            return backward(ctx, *grads)

    return run


_PLATFORM = CpuPlatform()


def enable_cpu_platform(force: bool = False) -> bool:
    """Enable the CPU platform. Without ``force`` it refuses on a machine that has CUDA, so a
    GPU job that passes ``--device cpu`` by mistake is told so instead of running slowly."""
    if torch.cuda.is_available() and not force:
        raise RuntimeError(
            "--device cpu was requested on a machine with CUDA; drop it to train on the GPU"
        )
    _PLATFORM.enable()
    return True


def disable_cpu_platform() -> None:
    """Restore every patched attribute (tests; switching back in one process)."""
    _PLATFORM.disable()


def cpu_platform_enabled() -> bool:
    return _PLATFORM.enabled


def unhandled_cuda_calls() -> list[str]:
    """Call sites that reached the CUDA runtime since the last :func:`clear_unhandled_cuda_calls`,
    including those whose exception was swallowed by a caller."""
    return list(_UNHANDLED)


def clear_unhandled_cuda_calls() -> None:
    _UNHANDLED.clear()


DEVICE_CHOICES = ("auto", "cpu", "cuda")  # --device of every entry point


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu`` (enabling the platform)."""
    if device not in DEVICE_CHOICES:
        raise ValueError(f"--device must be one of auto, cpu, cuda (got {device!r})")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but torch sees no CUDA device; "
                           "use --device cpu (or auto)")
    if device == "cpu":
        enable_cpu_platform()
    return device
