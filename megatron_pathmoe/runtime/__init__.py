"""The runtime every entry point stands on: the process group and megatron's parallel state
(seed, layout, device, CPU platform), rank-0 logging, the one warning filter and the
command-line conventions (one-line errors, a failure line naming the rank).

Below ``training/``, ``eval/``, ``analysis/`` and ``convert/``; above ``config`` and
``platform/``. It knows nothing about models or checkpoints.
"""

from megatron_pathmoe.runtime.console import (
    OneLineErrorParser,
    log,
    quiet_warnings,
    report_failure,
    warn,
)
from megatron_pathmoe.runtime.distributed import (
    DEFAULT_SEED,
    all_reduce_to_cpu,
    barrier,
    check_platform,
    destroy_distributed,
    distributed,
    initialize_distributed,
    initialize_model_parallel,
    is_rank0,
)

__all__ = [
    "DEFAULT_SEED",
    "OneLineErrorParser",
    "all_reduce_to_cpu",
    "barrier",
    "check_platform",
    "destroy_distributed",
    "distributed",
    "initialize_distributed",
    "initialize_model_parallel",
    "is_rank0",
    "log",
    "quiet_warnings",
    "report_failure",
    "warn",
]
