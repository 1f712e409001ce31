"""The trainer's side of :mod:`megatron_pathmoe.monitoring`: one :class:`RunWatch` per run
holds the Monitor (metrics.jsonl, TensorBoard, W&B), the step profiler, the FLOP count and
megatron-core's timers (``--timing-log-level``), and turns the metrics window's flushes and
validations into writes (the recipe in ``monitoring/monitor.py``)."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Mapping

import torch
import torch.distributed as dist

from megatron_pathmoe.config import PathMoEConfig
from megatron_pathmoe.monitoring import (
    Monitor,
    RunTimers,
    StepProfiler,
    flops_per_step,
    memory_scalars,
    peak_bf16_tflops,
    throughput_scalars,
)
from megatron_pathmoe.runtime import log
from megatron_pathmoe.training.arguments import TrainingConfig


def run_directory(train: TrainingConfig) -> str | None:
    """Where metrics.jsonl (and a profile trace) go: --save, else the --summary-json folder,
    else nowhere (no stream; a profile trace then lands in the working directory)."""
    if train.save:
        return train.save
    if train.summary_json:
        return os.path.dirname(os.path.abspath(train.summary_json))
    return None


class RunWatch:
    """Built in ``Trainer.setup`` after the checkpoint is loaded (``start_iteration``: its
    iteration, 0 for a fresh run: later lines of the stream and events are dropped).
    ``chunks`` (the DDP-wrapped model chunks) and ``optimizer`` get megatron's timers at
    --timing-log-level 1 or 2."""

    def __init__(self, model_cfg: PathMoEConfig, train: TrainingConfig, device: str,
                 start_iteration: int, chunks: list | None = None, optimizer=None) -> None:
        self.cfg, self.device, self.world = train.monitoring, device, dist.get_world_size()
        run_dir = run_directory(train)
        self.monitor = Monitor.from_config(
            self.cfg, run_dir, resume_iteration=start_iteration, log=log,
            run_config={"model": dataclasses.asdict(model_cfg),
                        "training": dataclasses.asdict(train)},
            router_block_size=model_cfg.router_block_size or 1)
        self.profiler = StepProfiler(self.cfg, run_dir or os.getcwd(), dist.get_rank())
        # Per token: a ramp-up step's FLOPs follow its tokens (tokens/s x s/iteration).
        self.token_flops = flops_per_step(model_cfg, 1, model_cfg.padded_vocab_size) / \
            model_cfg.seq_length
        self.peak_tflops = (peak_bf16_tflops(torch.cuda.get_device_name())
                            if device == "cuda" else None)
        self.timers = RunTimers.from_config(self.cfg, chunks, optimizer)
        self._timed_until = start_iteration  # the timers hold the iterations after it

    def before_step(self, iteration: int) -> None:
        self.profiler.step(iteration)

    def interval(self, iteration: int, scalars: Mapping[str, float], *, consumed_samples: int,
                 load: torch.Tensor | None, entropy: torch.Tensor | None) -> dict[str, float]:
        """One log interval (every rank: the memory scalars are local, the rest already
        reduced): throughput and memory per the flags, logged on their own lines, then
        written. Returns what was written."""
        scalars = {**scalars, "world-size": float(self.world)}
        if self.cfg.log_throughput:
            step_flops = self.token_flops * scalars["tokens-per-second"] * \
                scalars["iteration-time"]
            scalars |= throughput_scalars(step_flops, scalars["iteration-time"],
                                          self.world, self.peak_tflops)
            mfu = f" | MFU {100 * scalars['mfu']:.1f}%" if "mfu" in scalars else ""
            log(f"    throughput: {scalars['throughput']:.4g} TFLOP/s per GPU{mfu}")
        if self.timers is not None:
            scalars |= self._pop_timers(iteration)
        if self.cfg.log_memory:
            memory = memory_scalars(self.device)
            scalars |= memory
            log("    memory: " + " | ".join(
                f"{k.removeprefix('mem-').removesuffix('-bytes')} {v / 2**30:.3f} GiB"
                for k, v in memory.items()))
        self.monitor.write(iteration, scalars, consumed_samples=consumed_samples,
                           expert_load=load, routing_entropy=entropy)
        return scalars

    def _pop_timers(self, iteration: int) -> dict[str, float]:
        """The timers per iteration since the last log (collective), logged as Megatron-LM
        does; returns their "<name>-time" scalars."""
        scalars, text = self.timers.pop(iteration - self._timed_until)
        self._timed_until = iteration
        if text:
            log("    " + text.replace("\n", "\n    "))
        return scalars

    def validation(self, iteration: int, loss: float, consumed_samples: int) -> None:
        self.monitor.write(iteration, {"lm loss validation": loss,
                                       "lm loss validation ppl": math.exp(loss)},
                           consumed_samples=consumed_samples)

    def close(self) -> None:
        """Write a trace still being recorded, take the timers off the model and optimizer
        and close the sinks (idempotent)."""
        if self.timers is not None:
            self.timers.close()
            self.timers = None
        self.profiler.close()
        self.monitor.close()
        self.monitor.sinks = []
