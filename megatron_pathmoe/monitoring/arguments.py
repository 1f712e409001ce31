"""The monitoring flags: Megatron-LM's (core_v0.16.1) names, defaults and meanings where it
has them, plus the few PathMoE adds. ``add_monitoring_args`` builds the argparse groups,
``MonitoringConfig.from_args`` reads them back."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from megatron_pathmoe.config import ConfigError, dataclass_from_namespace

TIMING_LOG_LEVELS = (0, 1, 2)
TIMING_LOG_OPTIONS = ("minmax", "max", "all")


@dataclass
class MonitoringConfig:
    # TensorBoard (Megatron-LM: --tensorboard-dir and its --log-*-to-tensorboard switches).
    tensorboard_dir: str | None = None
    tensorboard_log_interval: int = 1
    tensorboard_queue_size: int = 1000
    log_timers_to_tensorboard: bool = False
    log_learning_rate_to_tensorboard: bool = True
    log_loss_scale_to_tensorboard: bool = True
    log_validation_ppl_to_tensorboard: bool = False
    log_memory_to_tensorboard: bool = False
    log_world_size_to_tensorboard: bool = False
    expert_load_histogram_interval: int = 100  # PathMoE: expert-load histograms, iterations
    # Throughput and memory in the log line and every sink.
    log_throughput: bool = False
    log_memory: bool = False
    # megatron-core timers (Megatron-LM's flags; level 0: none created).
    timing_log_level: int = 0
    timing_log_option: str = "minmax"
    barrier_with_L1_time: bool = True
    # Weights & Biases (Megatron-LM's names; empty project = off).
    wandb_project: str = ""
    wandb_exp_name: str = ""
    wandb_save_dir: str = ""
    wandb_entity: str = ""
    # The metrics stream (PathMoE): on unless disabled.
    metrics_stream: bool = True
    # torch.profiler (Megatron-LM's --profile with --use-pytorch-profiler).
    profile: bool = False
    profile_step_start: int = 10
    profile_step_end: int = 12
    profile_ranks: list[int] = field(default_factory=lambda: [0])

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "MonitoringConfig":
        """The fields of ``args`` that ``add_monitoring_args`` defined, validated."""
        return dataclass_from_namespace(cls, args).validate()

    def validate(self) -> "MonitoringConfig":
        for flag, value in (("--tensorboard-log-interval", self.tensorboard_log_interval),
                            ("--tensorboard-queue-size", self.tensorboard_queue_size),
                            ("--expert-load-histogram-interval",
                             self.expert_load_histogram_interval)):
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1 (got {value})")
        if self.timing_log_level not in TIMING_LOG_LEVELS:
            raise ConfigError(f"--timing-log-level must be 0, 1 or 2 (got "
                              f"{self.timing_log_level})")
        if self.timing_log_option not in TIMING_LOG_OPTIONS:
            raise ConfigError(f"--timing-log-option must be one of "
                              f"{', '.join(TIMING_LOG_OPTIONS)} (got {self.timing_log_option!r})")
        if self.profile and not 0 <= self.profile_step_start < self.profile_step_end:
            raise ConfigError(f"--profile-step-start {self.profile_step_start} must be >= 0 and "
                              f"below --profile-step-end {self.profile_step_end}")
        return self


def add_monitoring_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the groups "logging: tensorboard", "logging: weights & biases", "logging:
    throughput, memory, metrics stream" and "profiling" to ``parser``."""
    d = MonitoringConfig()
    g = parser.add_argument_group("logging: tensorboard")
    g.add_argument("--tensorboard-dir", default=None,
                   help="write TensorBoard event files here (one rank writes: the first rank "
                   "of the last pipeline stage); view with `tensorboard --logdir DIR`")
    g.add_argument("--tensorboard-log-interval", type=int, default=d.tensorboard_log_interval,
                   help="write to TensorBoard every N iterations (of those that log, i.e. "
                   "multiples of --log-interval)")
    g.add_argument("--tensorboard-queue-size", type=int, default=d.tensorboard_queue_size,
                   help="events queued before an add call forces a write to disk (the "
                   "queue is also flushed at every log interval)")
    g.add_argument("--log-timers-to-tensorboard", action="store_true",
                   help="also write the iteration time and, with --timing-log-level 1 or 2, "
                   "the timers (<name>-time: max over ranks, s per iteration) to TensorBoard")
    g.add_argument("--no-log-learning-rate-to-tensorboard", action="store_false",
                   dest="log_learning_rate_to_tensorboard",
                   help="do not write the learning rate to TensorBoard")
    g.add_argument("--no-log-loss-scale-to-tensorboard", action="store_false",
                   dest="log_loss_scale_to_tensorboard",
                   help="do not write the loss scale to TensorBoard")
    g.add_argument("--log-validation-ppl-to-tensorboard", action="store_true",
                   help="also write the validation perplexity to TensorBoard")
    g.add_argument("--log-memory-to-tensorboard", action="store_true",
                   help="also write memory (GPU allocated/reserved/peak, CPU RSS) to "
                   "TensorBoard")
    g.add_argument("--log-world-size-to-tensorboard", action="store_true",
                   help="also write the world size to TensorBoard")
    g.add_argument("--expert-load-histogram-interval", type=int,
                   default=d.expert_load_histogram_interval,
                   help="write per-layer histograms of expert load (relative to uniform) "
                   "at most once every N iterations (PathMoE; scalars go every interval)")
    g = parser.add_argument_group("logging: weights & biases")
    g.add_argument("--wandb-project", default=d.wandb_project,
                   help="W&B project name; empty (default) disables W&B. WANDB_MODE=offline "
                   "writes the run locally (no network); needs `pip install "
                   "megatron-pathmoe[monitoring]`")
    g.add_argument("--wandb-exp-name", default=d.wandb_exp_name, help="W&B run name")
    g.add_argument("--wandb-save-dir", default=d.wandb_save_dir,
                   help="directory for W&B's local files (default: W&B's ./wandb)")
    g.add_argument("--wandb-entity", default=d.wandb_entity,
                   help="W&B entity (user or team); empty: W&B's default")
    g = parser.add_argument_group("logging: throughput, memory, metrics stream")
    g.add_argument("--log-throughput", action="store_true",
                   help="log model TFLOP/s per GPU (and MFU where the GPU's bf16 peak is "
                   "known); see megatron_pathmoe.monitoring.flops for how MoE is counted")
    g.add_argument("--log-memory", action="store_true",
                   help="log memory every log interval: GPU allocated/reserved and their "
                   "peaks, CPU resident set size")
    g.add_argument("--timing-log-level", type=int, default=d.timing_log_level,
                   choices=TIMING_LOG_LEVELS,
                   help="megatron-core timers, logged every --log-interval (ms per iteration) "
                   "and written to metrics.jsonl: 0 none (no overhead); 1 operations run "
                   "about once per iteration (forward-backward, all-grads-sync, optimizer "
                   "and its parts); 2 also those run many times (forward/backward-compute per "
                   "micro-batch, batch-generator, pipeline send/recv, moe-permute/unpermute "
                   "per MoE layer). Levels 1 and 2 synchronise the GPU at each timer and may "
                   "slow training")
    g.add_argument("--timing-log-option", default=d.timing_log_option,
                   choices=TIMING_LOG_OPTIONS,
                   help="how the timers are reported over ranks: minmax (min and max), max, "
                   "all (every rank)")
    g.add_argument("--no-barrier-with-level-1-timing", action="store_false",
                   dest="barrier_with_L1_time",
                   help="do not put a barrier before the level-1 timers (by default they "
                   "start together on all ranks, so they measure the slowest rank)")
    g.add_argument("--no-metrics-stream", action="store_false", dest="metrics_stream",
                   help="do not append one JSON line per log interval to "
                   "<run dir>/metrics.jsonl (on by default; survives a kill, resumes "
                   "without repeating iterations)")
    g = parser.add_argument_group("profiling")
    g.add_argument("--profile", action="store_true",
                   help="record a torch.profiler trace (Chrome/TensorBoard format) of the "
                   "steps [--profile-step-start, --profile-step-end)")
    g.add_argument("--profile-step-start", type=int, default=d.profile_step_start,
                   help="first profiled iteration")
    g.add_argument("--profile-step-end", type=int, default=d.profile_step_end,
                   help="iteration at which profiling stops (not profiled)")
    g.add_argument("--profile-ranks", nargs="+", type=int, default=list(d.profile_ranks),
                   help="global ranks to profile (default: 0)")
    return parser
