"""megatron-core's own timers (``megatron.core.timers.Timers``) for one run, as Megatron-LM
wires them: ``--timing-log-level`` 1 or 2 puts one ``Timers`` on the model's
TransformerConfig (megatron's schedules time forward-backward, forward/backward-compute and
the pipeline send/recv; ``finalize_model_grads`` all-grads-sync and the embedding and
non-tensor-parallel all-reduces) and on the optimizer's OptimizerConfig (optimizer-copy-to-
main-grad, -clip-main-grad, -inner-step, ...). This project adds "optimizer" around the
optimizer step and "batch-generator" around the batch fetch (level 2, as Megatron-LM's
pretrain_gpt), and at level 2 "moe-permute"/"moe-unpermute" around every token permutation.
Level 0 (the default) creates no timer: megatron's call sites all check ``config.timers``.

Evaluation is not timed (Megatron-LM sets ``config.timers = None`` around it too):
:func:`timers_paused`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from megatron_pathmoe.monitoring.arguments import MonitoringConfig

# Logged in this order; a timer no rank started is left out (the names must be the same on
# every rank: the values are all-gathered).
TIMER_NAMES: tuple[str, ...] = (
    "forward-backward", "forward-compute", "backward-compute", "batch-generator",
    "moe-permute", "moe-unpermute",
    "forward-recv", "forward-send", "backward-recv", "backward-send",
    "forward-send-forward-recv", "forward-send-backward-recv", "backward-send-forward-recv",
    "backward-send-backward-recv", "forward-backward-send-forward-backward-recv",
    "all-grads-sync", "non-tensor-parallel-grads-all-reduce", "embedding-grads-all-reduce",
    "params-all-gather", "optimizer-copy-to-main-grad", "optimizer-unscale-and-check-inf",
    "optimizer-clip-main-grad", "optimizer-count-zeros", "optimizer-inner-step",
    "optimizer-copy-main-to-model-params", "optimizer",
)


def model_configs(chunks: list) -> list:
    """The distinct TransformerConfigs of the model chunks (the object megatron reads
    ``timers`` from)."""
    from megatron.core.utils import get_model_config

    configs = {id(c): c for c in (get_model_config(chunk) for chunk in chunks)}
    return list(configs.values())


def optimizer_configs(optimizer: Any) -> list[Any]:
    """The OptimizerConfigs of a megatron optimizer (each of a ChainedOptimizer's)."""
    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    configs = {id(p.config): p.config for p in parts if getattr(p, "config", None) is not None}
    return list(configs.values())


@contextlib.contextmanager
def timers_paused(chunks: list) -> Iterator[None]:
    """No timer runs inside (evaluation): every chunk config's ``timers`` is None, then
    restored."""
    configs = model_configs(chunks)
    saved = [config.timers for config in configs]
    for config in configs:
        config.timers = None
    try:
        yield
    finally:
        for config, timers in zip(configs, saved):
            config.timers = timers


class RunTimers:
    """One ``Timers`` installed on the model and optimizer configs; :meth:`pop` reads and
    resets them at each log interval (collective)."""

    def __init__(self, cfg: MonitoringConfig, chunks: list, optimizer=None) -> None:
        from megatron.core.timers import Timers

        from megatron_pathmoe.ops.dispatcher import set_permute_timing

        self.timers = Timers(cfg.timing_log_level, cfg.timing_log_option)
        self._configs = model_configs(chunks) + (optimizer_configs(optimizer)
                                                 if optimizer is not None else [])
        for config in self._configs:
            config.timers = self.timers
            config.barrier_with_L1_time = cfg.barrier_with_L1_time
        if cfg.timing_log_level >= 2:
            # Per call, so level 2 only (Megatron-LM's "operations executed many times").
            set_permute_timing(self._configs[0])

    @classmethod
    def from_config(cls, cfg: MonitoringConfig, chunks: list | None, optimizer=None
                    ) -> "RunTimers | None":
        """None at --timing-log-level 0 (or without a model): nothing installed."""
        if cfg.timing_log_level == 0 or not chunks:
            return None
        return cls(cfg, chunks, optimizer)

    def pop(self, iterations: int) -> tuple[dict[str, float], str | None]:
        """Every rank: the timers since the last call, per iteration (``iterations`` since
        then), then reset. Returns ``{"<name>-time": max over ranks, seconds}`` (Megatron-LM's
        TensorBoard tags and values) and the log text in the --timing-log-option layout (ms;
        None when no timer ran)."""
        names, normalizer = list(TIMER_NAMES), float(max(iterations, 1))
        # What Timers.write sends to TensorBoard, kept for every sink; then the log text.
        min_max = self.timers._get_global_min_max_time(names, reset=False, barrier=False,
                                                       normalizer=normalizer)
        text = self.timers.get_all_timers_string(names, normalizer=normalizer, reset=True)
        return {f"{name}-time": high for name, (_, high) in min_max.items()}, text

    def close(self) -> None:
        """Take the timers off the configs (a later run in this process starts clean)."""
        from megatron_pathmoe.ops.dispatcher import set_permute_timing

        set_permute_timing(None)
        for config in self._configs:
            config.timers = None
