"""Watching a run: the metrics stream (``<run dir>/metrics.jsonl``), TensorBoard and W&B
sinks, model FLOPs / TFLOP/s / MFU, memory, a step profiler with named ranges, and plots
from metrics.jsonl. The trainer builds one ``Monitor`` from ``MonitoringConfig`` (flags from
``add_monitoring_args``) and calls ``write(iteration, scalars, ...)`` at every log interval.

``SCALARS`` lists the scalar names (Megatron-LM's TensorBoard tags where it has them); any
other name passes through unchanged.
"""

from megatron_pathmoe.monitoring.arguments import MonitoringConfig, add_monitoring_args
from megatron_pathmoe.monitoring.flops import (
    flops_per_step,
    forward_flops_per_token,
    peak_bf16_tflops,
    throughput_scalars,
)
from megatron_pathmoe.monitoring.memory import memory_scalars
from megatron_pathmoe.monitoring.moe import expert_load_scalars
from megatron_pathmoe.monitoring.monitor import Monitor, is_logging_rank
from megatron_pathmoe.monitoring.profiler import RANGES, StepProfiler, profile_range
from megatron_pathmoe.monitoring.stream import METRICS_FILE, MetricsStream, read_metrics
from megatron_pathmoe.monitoring.timers import TIMER_NAMES, RunTimers, timers_paused

# name -> meaning; the trainer fills what it has (aux losses keep megatron's tracker names).
SCALARS: dict[str, str] = {
    "lm loss": "token-weighted mean LM loss of the global batch (nats/token)",
    "load_balancing_loss": "megatron's aux loss (per-iteration mean over MoE layers)",
    "z_loss": "megatron's router z-loss (same averaging)",
    "grad-norm": "global gradient norm before clipping (NaN on a skipped step)",
    "learning-rate": "learning rate after the step",
    "loss-scale": "loss scale (1.0 without fp16)",
    "skipped-iterations": "steps skipped so far (non-finite guard)",
    "tokens-per-second": "tokens/s over the log window (whole job)",
    "iteration-time": "seconds per iteration over the log window",
    "throughput": "model TFLOP/s per GPU (see monitoring.flops)",
    "mfu": "model FLOP utilisation, fraction of the GPU's dense bf16 peak",
    "world-size": "number of ranks",
    "mem-*": "memory_scalars(): GPU allocated/reserved (+ peaks), CPU RSS (+ peak), bytes",
    "lm loss validation": "validation loss (nats/token)",
    "lm loss validation ppl": "validation perplexity",
    "moe/expert_load_{max,min,cv}_layer_i": "expert load vs uniform per MoE layer",
    "moe/routing_entropy_layer_i": "routing entropy per layer, fraction of ln(experts)",
    "moe/..._block_b": "the same per router block (shared routers)",
    "<timer>-time": "--timing-log-level 1/2: megatron-core timer (TIMER_NAMES), max over "
                    "ranks, seconds per iteration (Megatron-LM's TensorBoard tag)",
}

__all__ = [
    "METRICS_FILE", "RANGES", "SCALARS", "TIMER_NAMES", "MetricsStream", "Monitor",
    "MonitoringConfig", "RunTimers", "StepProfiler", "add_monitoring_args",
    "expert_load_scalars", "flops_per_step", "forward_flops_per_token", "is_logging_rank",
    "memory_scalars", "peak_bf16_tflops", "profile_range", "read_metrics", "throughput_scalars", "timers_paused",
]
