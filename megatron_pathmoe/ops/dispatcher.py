"""Choose the permutation implementation of megatron-core's token dispatchers.

``MoEAllGatherTokenDispatcher`` and ``MoEAlltoAllTokenDispatcher`` call the module-level names
``permute``/``unpermute`` of ``megatron.core.transformer.moe.token_dispatcher`` (imported there
from ``moe_utils``). Rebinding those two names is the seam: ``moe_utils`` itself is never
touched, so ``install_permute_impl("megatron")`` restores megatron-core's own functions.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from megatron_pathmoe.ops import permutation, reference
from megatron_pathmoe.ops.extension import load_extension

logger = logging.getLogger(__name__)

PERMUTE_IMPLS = ("auto", "custom", "megatron", "reference")


def _default_device() -> str:
    from megatron_pathmoe.platform import cpu_platform_enabled

    return "cuda" if torch.cuda.is_available() and not cpu_platform_enabled() else "cpu"


def _functions(impl: str) -> tuple[Callable, Callable]:
    if impl == "custom":
        return permutation.permute, permutation.unpermute
    if impl == "reference":
        return reference.permute, reference.unpermute
    from megatron.core.transformer.moe import moe_utils

    return moe_utils.permute, moe_utils.unpermute


def _resolve(impl: str, device: str) -> str:
    if impl not in PERMUTE_IMPLS:
        raise ValueError(f"--permute-impl must be one of {', '.join(PERMUTE_IMPLS)} "
                         f"(got {impl!r})")
    extension = load_extension()
    if extension.supports(device):
        return "custom" if impl == "auto" else impl
    why = extension.reason or f"the extension was built without {device} kernels"
    if impl == "custom":
        raise RuntimeError(f"--permute-impl custom: the permutation kernels are not available on "
                           f"{device} ({why}); use --permute-impl auto or megatron")
    if impl == "auto":
        logger.warning("--permute-impl auto: using megatron-core's permute on %s, the custom "
                       "kernels are not available (%s)", device, why)
        return "megatron"
    return impl


def install_permute_impl(impl: str, device: Optional[str] = None) -> str:
    """Make megatron-core's allgather/alltoall token dispatchers use ``impl`` and return the
    implementation in effect ("auto" -> "custom" when the kernels load for ``device``, else
    "megatron" with a warning). ``device`` defaults to the training device (cuda unless absent
    or the CPU platform is on). Idempotent; ``"megatron"`` restores megatron-core's functions."""
    from megatron.core.transformer.moe import token_dispatcher

    resolved = _resolve(impl, device or _default_device())
    token_dispatcher.permute, token_dispatcher.unpermute = _functions(resolved)
    return resolved


def installed_permute_impl() -> str:
    """Which implementation the dispatchers call now ("custom", "megatron", "reference" or
    "other" when someone else rebound them)."""
    from megatron.core.transformer.moe import token_dispatcher

    current = (token_dispatcher.permute, token_dispatcher.unpermute)
    for impl in ("custom", "reference", "megatron"):
        if current == _functions(impl):
            return impl
    return "other"
