"""Finds (or builds once) the compiled permutation kernels.

Order of preference:

1. ``megatron_pathmoe/ops/_C*.so`` built by ``setup.py``, if its build label still matches
   ``csrc/`` (and it has CUDA kernels when they are wanted);
2. a build cache keyed by that label: ``$PATHMOE_OPS_BUILD_DIR``, else ``<repo>/build/pathmoe_ops``
   in a writable checkout, else ``~/.cache/megatron-pathmoe/ops``. The first process builds
   (~10 s for CPU, ~1 min with CUDA) under a file lock; concurrent torchrun ranks wait for it
   and then load the same file, later processes load it directly.

``PATHMOE_OPS_DISABLE=1`` turns the extension off (the pure-PyTorch paths remain).
"""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from megatron_pathmoe.ops import _build

MODULE_NAME = "megatron_pathmoe.ops._C"


@dataclass(frozen=True)
class Extension:
    """The loaded module (None when unavailable) and why it is unavailable."""

    module: ModuleType | None
    reason: str = ""

    def supports(self, device_type: str) -> bool:
        if self.module is None:
            return False
        return device_type == "cpu" or (device_type == "cuda" and self.module.has_cuda)

    def cuda_arch_problem(self, capability: tuple[int, int]) -> str | None:
        """Why the CUDA kernels have no image for a GPU of this compute capability (None:
        they have one, or PTX the driver compiles for it)."""
        return _build.arch_problem(getattr(self.module, "cuda_archs", "unknown"), capability)


def _cuda_wanted() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.version.cuda and _build.find_nvcc())


def _cache_dir() -> Path:
    if os.environ.get("PATHMOE_OPS_BUILD_DIR"):
        return Path(os.environ["PATHMOE_OPS_BUILD_DIR"])
    repo_build = _build.CSRC.parent / "build"
    if os.access(_build.CSRC.parent, os.W_OK):
        return repo_build / "pathmoe_ops"
    return Path.home() / ".cache" / "megatron-pathmoe" / "ops"


def _load_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _installed(with_cuda: bool) -> ModuleType | None:
    """The setup.py build, if it is current for csrc/ (or csrc/ is not shipped). Its label is
    read from the file: a stale module is never imported (it could shadow the fresh build)."""
    spec = importlib.util.find_spec(MODULE_NAME)
    if spec is None or not spec.origin:
        return None
    if _build.CSRC.is_dir():
        label = _build.file_build_hash(Path(spec.origin))
        if label not in _current_labels(with_cuda):
            return None
    return _load_file(Path(spec.origin))


def _current_labels(with_cuda: bool) -> set[str]:
    """Labels a current build may carry: with CUDA kernels (unless TORCH_CUDA_ARCH_LIST is
    invalid: then a fresh build reports it), and without them when they are not wanted."""
    labels = set() if with_cuda else {_build.build_hash(False)}
    try:
        labels.add(_build.build_hash(True))
    except _build.BuildError:
        pass
    return labels


def _build_cached(with_cuda: bool) -> ModuleType:
    label = _build.build_hash(with_cuda)
    directory = _cache_dir() / label
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / _build.extension_filename()
    with open(directory / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other ranks wait here while one builds
        if not target.exists():
            _build.build_extension(target, with_cuda)
    return _load_file(target)


@functools.lru_cache(maxsize=None)
def load_extension() -> Extension:
    """The kernels for this process, built on first use when needed; never raises."""
    if os.environ.get("PATHMOE_OPS_DISABLE") == "1":
        return Extension(None, "disabled by PATHMOE_OPS_DISABLE=1")
    with_cuda = _cuda_wanted()
    module = _installed(with_cuda)
    if module is not None:
        return Extension(module)
    if not _build.CSRC.is_dir():
        return Extension(None, f"no built extension and no sources at {_build.CSRC} to build")
    try:
        return Extension(_build_cached(with_cuda))
    except (_build.BuildError, OSError, ImportError) as error:
        return Extension(None, f"building csrc/ failed: {error}")
