"""Choose the permutation implementation of megatron-core's token dispatchers.

``MoEAllGatherTokenDispatcher`` and ``MoEAlltoAllTokenDispatcher`` call the module-level names
``permute``/``unpermute`` of ``megatron.core.transformer.moe.token_dispatcher`` (imported there
from ``moe_utils``). Rebinding those two names is the seam: ``moe_utils`` itself is never
touched, so ``install_permute_impl("megatron")`` restores megatron-core's own functions.

"custom" binds checked wrappers of the kernels: the first call per (device, dtype, mode) runs
:func:`megatron_pathmoe.ops.selfcheck.self_check` there. On a failure ``auto`` falls back to
megatron-core's permutation for the rest of the process (one warning line), ``custom`` raises.
``PATHMOE_OPS_SKIP_SELFCHECK=1`` skips the check (benchmarks). :func:`permute_impl_report`
says what happened, for the run summary. :func:`set_permute_timing` wraps whatever is bound in
megatron-core timers "moe-permute"/"moe-unpermute" (``--timing-log-level 2``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

import torch

from megatron_pathmoe.ops import permutation, reference, selfcheck
from megatron_pathmoe.ops.extension import load_extension
from megatron_pathmoe.platform.profiling import RANGE_PERMUTATION, profile_range

logger = logging.getLogger(__name__)

PERMUTE_IMPLS = ("auto", "custom", "megatron", "reference")

# What install_permute_impl chose and what the self-checks found (see permute_impl_report).
_state: dict = {"requested": None, "device": None, "fallback_reason": None,
                "timing": None}  # the config whose ``timers`` time the permutation
_checks: dict[tuple[str, str, str], str] = {}  # (device, dtype, mode) -> "passed"/"skipped"/why


def _default_device() -> str:
    from megatron_pathmoe.platform import cpu_platform_enabled

    return "cuda" if torch.cuda.is_available() and not cpu_platform_enabled() else "cpu"


def _fallback_impl() -> str:
    """What ``auto`` uses when the custom kernels are unusable. The seam for transformer-
    engine's fused permutation (issue 17): return it here where it is configured."""
    return "megatron"


def _key(tensor: torch.Tensor, drop_and_pad: bool) -> tuple[str, str, str]:
    mode = "drop_and_pad" if drop_and_pad else "dropless"
    return str(tensor.device), str(tensor.dtype).replace("torch.", ""), mode


def _checked(tensor: torch.Tensor, drop_and_pad: bool) -> bool:
    """Self-check the kernels for this call's device, dtype and mode once; True when the
    custom kernels may run it (False: ``auto`` fell back, the caller uses the fallback)."""
    key = _key(tensor, drop_and_pad)
    if key not in _checks:
        _checks[key] = _run_check(tensor.device, tensor.dtype, key[2])
    if _checks[key] in ("passed", "skipped"):
        return True
    why = f"self-check on {' '.join(key)} failed: {_checks[key]}"
    if _state["requested"] == "custom":
        raise RuntimeError(f"--permute-impl custom: the permutation kernels {why}; use "
                           "--permute-impl auto or megatron")
    if _state["fallback_reason"] is None:
        fallback = _fallback_impl()
        logger.warning("--permute-impl auto: using %s's permute, the custom kernels' %s",
                       fallback, why)
        _bind(fallback)
        _state["fallback_reason"] = why
    return False


def _run_check(device: torch.device, dtype: torch.dtype, mode: str) -> str:
    if selfcheck.skipped():
        return "skipped"
    start = time.perf_counter()
    try:
        selfcheck.self_check(device, dtype, mode)
    except selfcheck.SelfCheckError as error:
        return str(error)
    logger.debug("permutation self-check %s %s %s: %.1f ms", device, dtype, mode,
                 1e3 * (time.perf_counter() - start))
    return "passed"


def checked_permute(tokens, routing_map, probs=None, num_out_tokens=None, fused=False,
                    drop_and_pad=False):
    """permutation.permute after the self-check of its device/dtype/mode (same signature)."""
    use = permutation if fused or _checked(tokens, drop_and_pad and num_out_tokens is not None) \
        else _module(_fallback_impl())
    with profile_range(RANGE_PERMUTATION):
        return use.permute(tokens, routing_map, probs, num_out_tokens, fused, drop_and_pad)


def checked_unpermute(permuted_tokens, sorted_indices, restore_shape, probs=None,
                      routing_map=None, fused=False, drop_and_pad=False):
    """permutation.unpermute after the self-check of its device/dtype/mode (same signature)."""
    use = permutation if fused or _checked(permuted_tokens, drop_and_pad) \
        else _module(_fallback_impl())
    with profile_range(RANGE_PERMUTATION):
        return use.unpermute(permuted_tokens, sorted_indices, restore_shape, probs,
                             routing_map, fused, drop_and_pad)


def _module(impl: str):
    if impl == "reference":
        return reference
    from megatron.core.transformer.moe import moe_utils

    return moe_utils


def _functions(impl: str) -> tuple[Callable, Callable]:
    if impl == "custom":
        return checked_permute, checked_unpermute
    module = _module(impl)
    return module.permute, module.unpermute


def _bind(impl: str) -> None:
    _rebind(*_functions(impl))


def _rebind(permute: Callable, unpermute: Callable) -> None:
    from megatron.core.transformer.moe import token_dispatcher

    if _state["timing"] is not None:
        permute, unpermute = _timed("moe-permute", permute), _timed("moe-unpermute", unpermute)
    token_dispatcher.permute, token_dispatcher.unpermute = permute, unpermute


def _timed(name: str, fn: Callable) -> Callable:
    """``fn`` inside the megatron-core timer ``name`` (level 2) whenever the timing config's
    ``timers`` is set (it is None during evaluation)."""
    fn = _untimed(fn)

    def timed(*args, **kwargs):
        timers = _state["timing"].timers
        if timers is None:
            return fn(*args, **kwargs)
        timers(name, log_level=2).start()
        out = fn(*args, **kwargs)
        timers(name).stop()
        return out

    timed.untimed = fn
    return timed


def _untimed(fn: Callable) -> Callable:
    return getattr(fn, "untimed", fn)


def set_permute_timing(config: Any) -> None:
    """Time every forward permute/unpermute call of the dispatchers (whichever implementation
    is bound, a recompute included; their backward runs inside megatron's backward-compute)
    with ``config.timers`` ("moe-permute", "moe-unpermute", log level 2). Each call starts and
    stops a megatron Timer, which synchronises the GPU: Megatron-LM's level 2 ("operations
    executed many times per iteration; may slow training"). ``None`` unwraps."""
    from megatron.core.transformer.moe import token_dispatcher

    _state["timing"] = config
    _rebind(_untimed(token_dispatcher.permute), _untimed(token_dispatcher.unpermute))


def _unavailable(device: str) -> str | None:
    """Why the custom kernels cannot run on ``device`` (None: they can)."""
    extension = load_extension()
    device_type = torch.device(device).type
    if not extension.supports(device_type):
        return extension.reason or f"the extension was built without {device_type} kernels"
    if device_type == "cuda":
        return extension.cuda_arch_problem(torch.cuda.get_device_capability(device))
    return None


def _resolve(impl: str, device: str) -> str:
    if impl not in PERMUTE_IMPLS:
        raise ValueError(f"--permute-impl must be one of {', '.join(PERMUTE_IMPLS)} "
                         f"(got {impl!r})")
    if impl not in ("auto", "custom"):
        return impl
    why = _unavailable(device)
    if why is None:
        return "custom"
    if impl == "custom":
        raise RuntimeError(f"--permute-impl custom: the permutation kernels are not available on "
                           f"{device} ({why}); use --permute-impl auto or megatron")
    fallback = _fallback_impl()
    logger.warning("--permute-impl auto: using %s's permute on %s, the custom "
                   "kernels are not available (%s)", fallback, device, why)
    _state["fallback_reason"] = f"not available on {device}: {why}"
    return fallback


def install_permute_impl(impl: str, device: Optional[str] = None) -> str:
    """Make megatron-core's allgather/alltoall token dispatchers use ``impl`` and return the
    implementation in effect ("auto" -> "custom" when the kernels load for ``device``, else
    "megatron" with a warning). ``device`` defaults to the training device (cuda unless absent
    or the CPU platform is on). The custom kernels are self-checked at their first use per
    device, dtype and mode (see :func:`permute_impl_report`). Idempotent; ``"megatron"``
    restores megatron-core's functions."""
    device = device or _default_device()
    _state.update(requested=impl, device=device, fallback_reason=None)
    resolved = _resolve(impl, device)
    _bind(resolved)
    return resolved


def installed_permute_impl() -> str:
    """Which implementation the dispatchers call now ("custom", "megatron", "reference" or
    "other" when someone else rebound them)."""
    from megatron.core.transformer.moe import token_dispatcher

    current = (_untimed(token_dispatcher.permute), _untimed(token_dispatcher.unpermute))
    for impl in ("custom", "reference", "megatron"):
        if current == _functions(impl):
            return impl
    return "other"


def permute_impl_report() -> dict:
    """JSON-ready record for the run summary: the requested and installed implementation, the
    device, why ``auto`` fell back (or None) and every self-check run so far as
    ``{"cuda:0 bfloat16 dropless": "passed" | "skipped" | "<what failed>"}``."""
    return {"requested": _state["requested"], "installed": installed_permute_impl(),
            "device": _state["device"], "fallback_reason": _state["fallback_reason"],
            "self_checks": {" ".join(key): result for key, result in _checks.items()}}


def _reset_self_checks() -> None:
    """Forget the self-check results (tests that inject a broken kernel)."""
    _checks.clear()
