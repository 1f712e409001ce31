"""What makes megatron-core run on CPU over gloo; inert unless enabled."""

from megatron_pathmoe.platform.cpu import (
    DEVICE_CHOICES,
    UnhandledCudaCallError,
    clear_unhandled_cuda_calls,
    cpu_platform_enabled,
    disable_cpu_platform,
    enable_cpu_platform,
    resolve_device,
    unhandled_cuda_calls,
)

__all__ = [
    "DEVICE_CHOICES",
    "UnhandledCudaCallError",
    "clear_unhandled_cuda_calls",
    "cpu_platform_enabled",
    "disable_cpu_platform",
    "enable_cpu_platform",
    "resolve_device",
    "unhandled_cuda_calls",
]
