"""Token permutation for MoE dispatch: compiled kernels (csrc/), their autograd Functions, a
pure-PyTorch reference and the switch that plugs either into megatron-core's dispatchers.

``install_permute_impl(impl)`` is what training calls (``--permute-impl``), and
``permute_impl_report()`` what it records (the kernels' self-check on their device); ``permute`` and
``unpermute`` are drop-ins for megatron-core 0.16.1's unfused ``moe_utils`` functions.
"""

from megatron_pathmoe.ops.dispatcher import (
    PERMUTE_IMPLS,
    install_permute_impl,
    installed_permute_impl,
    permute_impl_report,
)
from megatron_pathmoe.ops.extension import load_extension
from megatron_pathmoe.ops.permutation import permute, unpermute

__all__ = [
    "PERMUTE_IMPLS",
    "install_permute_impl",
    "installed_permute_impl",
    "load_extension",
    "permute",
    "permute_impl_report",
    "unpermute",
]
