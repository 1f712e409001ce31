"""The one object the trainer talks to: ``Monitor.from_config`` in setup,
``write(iteration, scalars, ...)`` at every log interval (and after a validation),
``close()`` at the end. Only the logging rank (the first rank of the last pipeline stage,
which holds the loss, as in Megatron-LM) gets sinks; elsewhere every call is a no-op.

Wiring, in the trainer (``mon = MonitoringConfig.from_args(args)``)::

    # setup, once the checkpoint is loaded (start = its iteration, 0 for a fresh run)
    monitor = Monitor.from_config(mon, run_dir, resume_iteration=start, run_config=config,
                                  router_block_size=model_cfg.router_block_size or 1)
    profiler = StepProfiler(mon, run_dir, dist.get_rank())
    step_flops = flops_per_step(model_cfg, global_batch_size, padded_vocab_size)
    # each iteration, first:            profiler.step(iteration)
    # each log interval (every rank):   scalars named as monitoring.SCALARS, then
    scalars |= throughput_scalars(step_flops, seconds_per_iter, world, peak)  # --log-throughput
    scalars |= memory_scalars(device)                                         # --log-memory
    monitor.write(iteration, scalars, consumed_samples=consumed, expert_load=load,
                  routing_entropy=entropy)
    # after a validation: monitor.write(iteration, {"lm loss validation": v,
    #                                   "lm loss validation ppl": exp(v)}, consumed_samples=...)
    # end: monitor.close(); profiler.close()
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import torch

from megatron_pathmoe.monitoring.arguments import MonitoringConfig
from megatron_pathmoe.monitoring.moe import expert_load_scalars
from megatron_pathmoe.monitoring.stream import METRICS_FILE, MetricsStream


class Monitor:
    def __init__(self, sinks: list[Any], router_block_size: int = 1,
                 histogram_interval: int = 100) -> None:
        self.sinks = sinks
        self.router_block_size = router_block_size
        self.histogram_interval = histogram_interval
        self._last_histogram_slot = -1

    @classmethod
    def from_config(cls, cfg: MonitoringConfig, run_dir: str | None, *,
                    resume_iteration: int = 0, run_config: Mapping[str, Any] | None = None,
                    router_block_size: int = 1, writer: bool | None = None,
                    log: Callable[[str], None] = print) -> "Monitor":
        """The sinks ``cfg`` asks for: ``<run_dir>/metrics.jsonl`` (unless
        --no-metrics-stream or no run dir), TensorBoard, W&B. ``resume_iteration``: the
        loaded checkpoint's iteration (0 for a fresh run); what the sinks hold after it is
        dropped. ``router_block_size`` > 1 adds per-block series (shared routers).
        ``writer``: whether this rank writes (default: ``is_logging_rank()``)."""
        if not (is_logging_rank() if writer is None else writer):
            return cls([])
        sinks: list[Any] = []
        if cfg.metrics_stream and run_dir:
            sinks.append(MetricsStream(os.path.join(run_dir, METRICS_FILE), resume_iteration,
                                       log))
        if cfg.tensorboard_dir:
            from megatron_pathmoe.monitoring.sinks import TensorBoardSink

            sinks.append(TensorBoardSink(cfg, resume_iteration))
        if cfg.wandb_project:
            from megatron_pathmoe.monitoring.sinks import WandbSink

            sinks.append(WandbSink(cfg, run_config))
        return cls(sinks, router_block_size, cfg.expert_load_histogram_interval)

    def write(self, iteration: int, scalars: Mapping[str, float], *, consumed_samples: int,
              expert_load: torch.Tensor | None = None,
              routing_entropy: torch.Tensor | None = None) -> None:
        """Send ``scalars`` (named as in ``monitoring.SCALARS``) to every sink; with
        ``expert_load`` [layers, experts] (relative to uniform) and ``routing_entropy``
        [layers] (nats) also the per-layer/per-block MoE series, and expert-load histograms
        once per --expert-load-histogram-interval."""
        if not self.sinks:
            return
        scalars = dict(scalars)
        if expert_load is not None:
            scalars.update(expert_load_scalars(expert_load, routing_entropy,
                                               self.router_block_size))
        for sink in self.sinks:
            sink.write(iteration, scalars, consumed_samples)
        slot = iteration // self.histogram_interval
        if expert_load is not None and slot > self._last_histogram_slot:
            self._last_histogram_slot = slot
            values = {f"moe/expert_load_layer_{i}": row for i, row in enumerate(expert_load, 1)}
            for sink in self.sinks:
                if hasattr(sink, "write_histograms"):
                    sink.write_histograms(iteration, values)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def is_logging_rank() -> bool:
    """True on the rank that writes the logs: the first rank (tensor, context and data
    parallel rank 0) of the last pipeline stage; a world of one is that rank."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return True
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return dist.get_rank() == dist.get_world_size() - 1
    return (ps.is_pipeline_last_stage(ignore_virtual=True)
            and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_context_parallel_rank() == 0
            and ps.get_data_parallel_rank() == 0)
