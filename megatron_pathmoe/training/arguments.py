"""Megatron-LM-style command line for pretraining, parsed into config objects.

Everything that can be checked without a process group (flags, data files, tokenizer) is
checked here, so a mistake costs one line on stderr instead of a crash on every rank.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from megatron_pathmoe.config import (
    DISPATCHER_CHOICES,
    ROUTING_CHOICES,
    SCORE_FUNCTION_CHOICES,
    ConfigError,
    PathMoEConfig,
    dataclass_from_namespace,
)
from megatron_pathmoe.data.encoders import (
    TokenizerSpec,
    add_tokenizer_arguments,
    spec_from_arguments,
)
from megatron_pathmoe.monitoring import MonitoringConfig, add_monitoring_args
from megatron_pathmoe.ops import PERMUTE_IMPLS
from megatron_pathmoe.platform import DEVICE_CHOICES
from megatron_pathmoe.runtime import OneLineErrorParser
from megatron_pathmoe.training.cluster import (
    DECOUPLED_LR_FIELDS,
    ClusterConfig,
    add_cluster_args,
    check_data_sources,
    check_resumable,
    validate_cluster,
)
from megatron_pathmoe.training.megatron_compat import (
    add_architecture_args,
    add_shape_args,
    add_unsupported_args,
    resolve_architecture,
)
from megatron_pathmoe.training.performance import (
    PerformanceConfig,
    add_performance_args,
    validate_performance,
)
from megatron_pathmoe.training.rampup import BatchRampup, GlobalBatchSchedule

NONFINITE_ACTIONS = ("stop", "skip")  # --nonfinite-action
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
LR_WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
WD_INCR_STYLES = ("constant", "linear", "cosine")
DEFAULT_TRAIN_ITERS, DEFAULT_WARMUP_ITERS = 100, 10  # without --train-iters/--train-samples


@dataclass(frozen=True)
class LRSchedule:
    """megatron-core ``OptimizerParamScheduler``'s step counts, in its step unit: iterations
    for an iteration budget, samples for ``--train-samples`` (as Megatron-LM, which counts
    samples throughout; with a fixed global batch an iteration budget gives the same LR per
    iteration either way)."""

    warmup_steps: float
    decay_steps: int
    wsd_decay_steps: int | None
    wd_incr_steps: int
    in_samples: bool = False  # the scheduler counts samples (--train-samples), else iterations

    def step_increment(self, global_batch_size: int) -> int:
        """Scheduler steps for one iteration of ``global_batch_size`` samples (a ramp-up
        step is smaller than --global-batch-size; an iteration budget counts 1)."""
        return global_batch_size if self.in_samples else 1


@dataclass
class TrainingConfig:
    micro_batch_size: int = 4
    global_batch_size: int = 16
    # --rampup-batch-size START INCREMENT SAMPLES (training/rampup.py; --train-samples only)
    rampup_batch_size: list[int] | None = None
    train_iters: int = DEFAULT_TRAIN_ITERS  # with --train-samples: train_samples // batch
    train_samples: int | None = None
    lr: float = 3e-3
    min_lr: float = 3e-4
    # Megatron-LM's --decoupled-lr/--decoupled-min-lr: the input embedding and output layer's
    # own schedule bounds (None: --lr/--min-lr).
    decoupled_lr: float | None = None
    decoupled_min_lr: float | None = None
    lr_warmup_init: float = 0.0
    lr_warmup_iters: int = DEFAULT_WARMUP_ITERS
    lr_warmup_samples: int = 0
    lr_warmup_fraction: float | None = None
    lr_decay_iters: int | None = None  # None: train_iters
    lr_decay_samples: int | None = None  # None: train_samples
    lr_decay_style: str = "cosine"
    lr_wsd_decay_style: str = "exponential"
    lr_wsd_decay_iters: int | None = None
    lr_wsd_decay_samples: int | None = None
    weight_decay: float = 0.1
    start_weight_decay: float | None = None  # None: weight_decay
    end_weight_decay: float | None = None  # None: weight_decay
    weight_decay_incr_style: str = "constant"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    # On --load: the checkpoint's schedule lengths win (default), or with
    # --override-opt_param-scheduler the flags' (Megatron-LM's default, neither flag, requires
    # them to be equal).
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False
    clip_grad: float = 1.0
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 0  # 0: evaluate only at the end
    eval_iters: int = 10
    use_distributed_optimizer: bool = False
    data_path: list[str] = field(default_factory=list)
    valid_data_path: list[str] = field(default_factory=list)
    split: str = "98,2,0"
    tokenizer_type: str = "HuggingFaceTokenizer"
    tokenizer_model: str = ""
    vocab_file: str | None = None
    merge_file: str | None = None
    eod_token: str | None = None
    vocab_size: int | None = None  # --vocab-size (NullTokenizer)
    legacy_tokenizer: bool = False  # --legacy-tokenizer (SentencePiece, Llama2 tokenizers)
    data_cache_path: str | None = None
    eod_mask_loss: bool = False  # --eod-mask-loss: no loss on predictions made from an EOD
    device: str = "auto"
    transformer_impl: str | None = None  # None: platform.gpu.default_transformer_impl(device)
    summary_json: str | None = None
    distributed_timeout_minutes: int = 10
    permute_impl: str = "auto"
    save: str | None = None
    load: str | None = None
    save_interval: int = 0  # 0: save only at the end (when --save is given)
    keep_last: int | None = None
    nonfinite_action: str = "stop"
    max_skipped_steps: int = 10
    dry_run: bool = False
    dry_run_world_size: int | None = None  # --dry-run: the world size to check the layout for
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)

    def tokenizer_spec(self) -> TokenizerSpec:
        """The tokenizer the ``--tokenizer-*``, ``--vocab-file``, ``--merge-file`` flags name."""
        eod = self.eod_token
        return TokenizerSpec(self.tokenizer_type, self.tokenizer_model or None, self.vocab_file,
                             self.merge_file, int(eod) if eod and eod.isdigit() else eod,
                             self.vocab_size, self.legacy_tokenizer)

    def lr_schedule(self) -> LRSchedule:
        """The scheduler's warmup, decay and weight-decay steps (Megatron-LM's
        ``get_optimizer_param_scheduler``: a warmup fraction is of the decay steps)."""
        if self.train_samples is None:
            decay, warmup, wsd = (_or(self.lr_decay_iters, self.train_iters),
                                  self.lr_warmup_iters, self.lr_wsd_decay_iters)
            total = self.train_iters
        else:
            decay, warmup, wsd = (_or(self.lr_decay_samples, self.train_samples),
                                  self.lr_warmup_samples, self.lr_wsd_decay_samples)
            total = self.train_samples
        if self.lr_warmup_fraction is not None:
            warmup = self.lr_warmup_fraction * decay
        return LRSchedule(warmup, decay, wsd, total, self.train_samples is not None)

    def weight_decay_range(self) -> tuple[float, float]:
        """(start, end) of the weight decay: ``--start-/--end-weight-decay``, else
        ``--weight-decay``."""
        start, end = self.start_weight_decay, self.end_weight_decay
        return (self.weight_decay if start is None else start,
                self.weight_decay if end is None else end)

    def data_parallel_size(self, model: PathMoEConfig, world_size: int) -> int:
        return world_size // (model.tensor_model_parallel_size * model.pipeline_model_parallel_size)

    def num_microbatches(self, model: PathMoEConfig, world_size: int,
                         global_batch_size: int | None = None) -> int:
        """Micro-batches per step on each data-parallel rank, for ``--global-batch-size`` or
        the given (ramp-up) global batch."""
        dp = self.data_parallel_size(model, world_size)
        return (global_batch_size or self.global_batch_size) // (self.micro_batch_size * dp)

    def batch_schedule(self) -> GlobalBatchSchedule:
        """Every step's global batch size (``--rampup-batch-size``, else fixed)."""
        return GlobalBatchSchedule(self.global_batch_size,
                                   BatchRampup.from_flag(self.rampup_batch_size))


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="pathmoe-pretrain",
        description="Pretrain a PathMoE (or independent-routing) GPT with megatron-core. "
                    "Launch with torchrun (also --nproc_per_node 1); runs on CPU over gloo "
                    "when no GPU is present.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # as Megatron-LM: a misspelt flag is an error, not another flag
    )
    model, train = PathMoEConfig(), TrainingConfig()
    _model_flags(parser, model)
    add_architecture_args(parser)
    _moe_and_routing_flags(parser, model)
    _parallel_flags(parser, model)
    _training_flags(parser, train)
    _lr_flags(parser, train)
    _data_flags(parser, train)
    _runtime_flags(parser, train)
    _checkpointing_flags(parser, train)
    add_performance_args(parser)
    add_cluster_args(parser)
    add_monitoring_args(parser)  # Megatron-LM's logging groups
    add_unsupported_args(parser)  # last: skips what any group above implements
    return parser


def _model_flags(parser: argparse.ArgumentParser, m: PathMoEConfig) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=m.num_layers)
    g.add_argument("--hidden-size", type=int, default=m.hidden_size)
    g.add_argument("--num-attention-heads", type=int, default=m.num_attention_heads)
    g.add_argument("--num-query-groups", type=int, default=None,
                   help="KV heads for grouped-query attention (default: = attention heads)")
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None,
                   help=f"expert FFN width (default: --ffn-hidden-size, else "
                        f"{m.moe_ffn_hidden_size})")
    add_shape_args(g)
    g.add_argument("--seq-length", type=int, default=m.seq_length)
    g.add_argument("--rotary-base", type=int, default=m.rotary_base)
    g.add_argument("--norm-epsilon", type=float, default=m.norm_epsilon)
    g.add_argument("--init-method-std", type=float, default=m.init_method_std)
    g.add_argument("--untie-embeddings-and-output-weights", default=True,
                   action=argparse.BooleanOptionalAction,
                   help="separate input embedding and output layer (default: untied, unlike "
                        "Megatron-LM; --no-untie-embeddings-and-output-weights ties them)")
    g.add_argument("--attention-dropout", type=float, default=m.attention_dropout)
    g.add_argument("--hidden-dropout", type=float, default=m.hidden_dropout)
    g.add_argument("--bf16", action="store_true")


def _moe_and_routing_flags(parser: argparse.ArgumentParser, m: PathMoEConfig) -> None:
    g = parser.add_argument_group("mixture of experts and routing")
    g.add_argument("--num-experts", type=int, default=m.num_experts)
    g.add_argument("--moe-router-topk", type=int, default=m.moe_router_topk)
    g.add_argument("--moe-aux-loss-coeff", type=float, default=m.moe_aux_loss_coeff,
                   help="switch load-balancing loss weight (0 disables it; PathMoE trains "
                        "without it)")
    g.add_argument("--moe-z-loss-coeff", type=float, default=None,
                   help="router z-loss weight (ST-MoE; keeps logits small)")
    g.add_argument("--moe-router-pre-softmax", default=m.moe_router_pre_softmax,
                   action=argparse.BooleanOptionalAction,
                   help="softmax over all experts before top-k (paper eq. 3.1-3.2)")
    g.add_argument("--moe-router-score-function", choices=SCORE_FUNCTION_CHOICES,
                   default=m.moe_router_score_function)
    g.add_argument("--moe-router-topk-scaling-factor", type=float, default=None,
                   help="multiply the selected experts' gate weights by this (default 1)")
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None,
                   help="add a shared expert of this FFN width that every token passes "
                        "through (DeepSeek/Qwen-MoE; tensor-parallel like attention)")
    g.add_argument("--moe-shared-expert-gate", action="store_true",
                   help="scale the shared expert's output by a learned sigmoid gate per token "
                        "(Qwen2-MoE's shared_expert_gate; needed for a Hugging Face export)")
    g.add_argument("--moe-shared-expert-overlap", action="store_true",
                   help="compute the shared expert while the alltoall dispatcher communicates "
                        "(megatron-core's overlap; same numbers)")
    g.add_argument("--moe-router-force-load-balancing", action="store_true",
                   help="benchmarking aid: every router routes on random logits (a balanced "
                        "load; the model learns no routing and cannot be exported)")
    g.add_argument("--moe-router-num-groups", type=int, default=None,
                   help="group-limited routing: experts form this many equal groups (e.g. the "
                        "expert-parallel size: device-limited routing)")
    g.add_argument("--moe-router-group-topk", type=int, default=None,
                   help="group-limited routing: each token's top-k experts come from its this "
                        "many best groups (a group scores the sum of its top-k / group-topk "
                        "expert scores)")
    g.add_argument("--moe-router-enable-expert-bias", action="store_true",
                   help="aux-loss-free load balancing: a per-expert selection bias moved "
                        "towards balance after every global batch (needs "
                        "--moe-router-score-function sigmoid); shared routers share it per "
                        "block")
    g.add_argument("--moe-router-bias-update-rate", type=float,
                   default=m.moe_router_bias_update_rate)
    g.add_argument("--moe-token-dispatcher-type", choices=DISPATCHER_CHOICES,
                   default=m.moe_token_dispatcher_type)
    g.add_argument("--routing", choices=ROUTING_CHOICES, default=m.routing,
                   help="independent = Indep-MoE (a TopKRouter per layer); path = PathB{B}-MoE "
                        "(one router per block of --path-block-size layers; B = num-layers is "
                        "PathMoE); random = Rand-MoE (random routers, frozen); xmoe = X-MoE "
                        "(cosine routing in a --xmoe-dim space with a learned, bounded "
                        "temperature; with --path-block-size B > 1: PathB{B}X-MoE); recurrent = "
                        "Recurrent-MoE (per-layer projections around one GRU shared over "
                        "depth); mono = MonoB{B}-MoE (the first layer of each block routes, the "
                        "others reuse its decisions); lowrank = LowRank-MoE (a router shared "
                        "by all layers plus a per-layer rank --lowrank-rank correction)")
    g.add_argument("--path-block-size", type=int, default=None,
                   help="B consecutive MoE layers share their router (path, xmoe) or routing "
                        "decision (mono); default 4 for path and mono, 1 for xmoe")
    g.add_argument("--xmoe-dim", type=int, default=m.xmoe_dim,
                   help="X-MoE routing-space dimension")
    g.add_argument("--xmoe-temperature-init", type=float, default=m.xmoe_temperature_init)
    g.add_argument("--xmoe-temperature-min", type=float, default=m.xmoe_temperature_min)
    g.add_argument("--xmoe-temperature-max", type=float, default=m.xmoe_temperature_max)
    g.add_argument("--recurrent-router-dim", type=int, default=m.recurrent_router_dim,
                   help="Recurrent-MoE GRU state size r")
    g.add_argument("--lowrank-rank", type=int, default=m.lowrank_rank,
                   help="LowRank-MoE per-layer correction rank (0: one shared router)")
    g.add_argument("--moe-path-restriction", default=None, metavar="PATHS.npy",
                   help="train with every token's top-1 expert path confined to the paths in "
                        "this file (from `python -m megatron_pathmoe.analysis.record_paths`)")
    g.add_argument("--moe-path-restriction-top-k", type=int, default=None,
                   help="use only the K most frequent paths of --moe-path-restriction")


def _parallel_flags(parser: argparse.ArgumentParser, m: PathMoEConfig) -> None:
    g = parser.add_argument_group(
        "parallelism", "world size = TP x PP x DP; experts are split over EP ranks taken from "
        "DP x TP (expert-DP = world / (PP x EP)); experts are never tensor-parallel")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="TP: attention and embeddings split over this many ranks (needs "
                        "--sequence-parallel)")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="PP: layers split into this many stages; router blocks that span "
                        "stages are kept identical across them")
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None,
                   help="model chunks per pipeline rank (interleaved 1F1B); needs PP > 1, "
                        "layers divisible by PP x VPP and micro-batches a multiple of PP")
    g.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="EP: experts split over this many ranks")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split norms, dropout and MoE tokens over the TP ranks (required "
                        "with TP > 1; ignored at TP 1, as Megatron-LM)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard Adam states and fp32 main weights over the data-parallel ranks")


def _training_flags(parser: argparse.ArgumentParser, t: TrainingConfig) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=t.micro_batch_size)
    g.add_argument("--global-batch-size", type=int, default=t.global_batch_size)
    g.add_argument("--rampup-batch-size", nargs=3, type=int, default=None,
                   metavar=("START", "INCREMENT", "SAMPLES"),
                   help="grow the global batch from START by INCREMENT over SAMPLES samples to "
                        "--global-batch-size (needs --train-samples)")
    g.add_argument("--train-iters", type=int, default=None,
                   help=f"iterations to train (default {t.train_iters}; or --train-samples)")
    g.add_argument("--train-samples", type=int, default=None,
                   help="samples to train: train-samples // global-batch-size iterations; the "
                        "LR schedule then counts samples (--lr-*-samples)")
    g.add_argument("--weight-decay", type=float, default=t.weight_decay)
    g.add_argument("--start-weight-decay", type=float, default=None,
                   help="weight decay at iteration 0 (default: --weight-decay)")
    g.add_argument("--end-weight-decay", type=float, default=None,
                   help="weight decay at the end of training (default: --weight-decay)")
    g.add_argument("--weight-decay-incr-style", choices=WD_INCR_STYLES,
                   default=t.weight_decay_incr_style)
    g.add_argument("--adam-beta1", type=float, default=t.adam_beta1)
    g.add_argument("--adam-beta2", type=float, default=t.adam_beta2)
    g.add_argument("--adam-eps", type=float, default=t.adam_eps)
    g.add_argument("--clip-grad", type=float, default=t.clip_grad)
    g.add_argument("--calculate-per-token-loss", action="store_true",
                   help="weigh every unmasked token of the global batch equally (loss sum / "
                        "token count over all micro-batches and ranks) instead of averaging "
                        "per-micro-batch means; differs only when loss masks differ "
                        "(--eod-mask-loss)")
    g.add_argument("--seed", type=int, default=t.seed)
    g.add_argument("--log-interval", type=int, default=t.log_interval)
    g.add_argument("--eval-interval", type=int, default=t.eval_interval,
                   help="iterations between validations (0: only at the end)")
    g.add_argument("--eval-iters", type=int, default=t.eval_iters,
                   help="global batches per validation")


def _lr_flags(parser: argparse.ArgumentParser, t: TrainingConfig) -> None:
    g = parser.add_argument_group("learning rate")
    g.add_argument("--lr", type=float, default=t.lr)
    g.add_argument("--min-lr", type=float, default=t.min_lr)
    g.add_argument("--decoupled-lr", type=float, default=None,
                   help="peak LR of the input embedding and output layer (their own param "
                        "group, same schedule shape; default --lr)")
    g.add_argument("--decoupled-min-lr", type=float, default=None,
                   help="with --decoupled-lr: their minimum LR (default --min-lr)")
    g.add_argument("--lr-decay-style", choices=LR_DECAY_STYLES, default=t.lr_decay_style)
    g.add_argument("--lr-decay-iters", type=int, default=None,
                   help="iterations to decay the LR over (default: --train-iters)")
    g.add_argument("--lr-decay-samples", type=int, default=None,
                   help="with --train-samples: samples to decay over (default: --train-samples)")
    g.add_argument("--lr-warmup-iters", type=int, default=None,
                   help=f"linear warmup iterations (default {t.lr_warmup_iters} with "
                        "--train-iters, unlike Megatron-LM's 0)")
    g.add_argument("--lr-warmup-samples", type=int, default=t.lr_warmup_samples,
                   help="with --train-samples: linear warmup samples")
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warmup as a fraction of the decay steps (instead of --lr-warmup-*)")
    g.add_argument("--lr-warmup-init", type=float, default=t.lr_warmup_init,
                   help="LR at the start of the warmup")
    g.add_argument("--lr-wsd-decay-style", choices=LR_WSD_DECAY_STYLES,
                   default=t.lr_wsd_decay_style,
                   help="--lr-decay-style WSD: shape of the final anneal")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                   help="--lr-decay-style WSD: iterations of the final anneal")
    g.add_argument("--lr-wsd-decay-samples", type=int, default=None,
                   help="--lr-decay-style WSD with --train-samples: samples of the final anneal")
    g.add_argument("--override-opt_param-scheduler", "--override-lr-scheduler",
                   action="store_true", dest="override_opt_param_scheduler",
                   help="on --load, take the schedule's steps and style (warmup, decay, "
                        "weight decay) from these flags instead of the checkpoint; the LR "
                        "bounds always follow --lr/--min-lr")
    g.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-lr-scheduler",
                   action="store_true", dest="use_checkpoint_opt_param_scheduler",
                   help="on --load, take the schedule from the checkpoint (the default here; "
                        "Megatron-LM's default refuses a schedule that differs)")


def _data_flags(parser: argparse.ArgumentParser, t: TrainingConfig) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=[],
                   help="train prefixes (path without .bin/.idx), optionally 'weight prefix' "
                        "pairs")
    g.add_argument("--valid-data-path", nargs="+", default=[],
                   help="validation prefixes (default: --split of --data-path)")
    g.add_argument("--split", default=t.split)
    add_tokenizer_arguments(g)
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--eod-mask-loss", action="store_true",
                   help="no loss where the input token is the end of document (the first "
                        "token of the next document is not predicted from the previous one), "
                        "as Megatron-LM; training and validation")


def _runtime_flags(parser: argparse.ArgumentParser, t: TrainingConfig) -> None:
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                   help="cpu runs megatron-core over gloo (auto: cpu when CUDA is absent)")
    g.add_argument("--transformer-impl", choices=("local", "transformer_engine"),
                   default=None,
                   help="default: transformer_engine when training on CUDA and it imports, "
                        "else local (as Megatron-LM)")
    g.add_argument("--summary-json", default=None, help="write the run summary here")
    g.add_argument("--distributed-timeout-minutes", type=int,
                   default=t.distributed_timeout_minutes,
                   help="a collective that waits longer (a dead or hung rank) ends the job")
    g.add_argument("--permute-impl", choices=PERMUTE_IMPLS,
                   default=t.permute_impl,
                   help="token permutation in the MoE dispatchers: custom = this project's "
                        "C++/CUDA ops (csrc/), megatron = megatron-core's unfused permute, "
                        "reference = the pure-PyTorch reference; auto = custom when built")
    g.add_argument("--dry-run", action="store_true",
                   help="check the config and parallel layout, print the parameter counts "
                        "(total, active) and a per-rank memory estimate, and exit; needs no "
                        "data, tokenizer, process group or GPU")
    g.add_argument("--dry-run-world-size", type=int, default=None,
                   help="--dry-run: the world size to check the layout for, e.g. NNODES x "
                        "GPUS_PER_NODE (default: $WORLD_SIZE, else 1)")
    g.add_argument("--dry-run-vocab-size", type=int, default=None,
                   help="--dry-run without --tokenizer-model: the tokenizer's vocabulary "
                        "size (before padding)")


def _checkpointing_flags(parser: argparse.ArgumentParser, t: TrainingConfig) -> None:
    g = parser.add_argument_group("checkpointing and faults")
    g.add_argument("--save", default=None,
                   help="directory for checkpoints (iter_XXXXXXX/ + "
                        "latest_checkpointed_iteration.txt); saved at --save-interval and at "
                        "the end")
    g.add_argument("--load", default=None,
                   help="resume from this directory's newest complete checkpoint (or an "
                        "iter_XXXXXXX folder); the parallel layout may differ from the saving "
                        "run's")
    g.add_argument("--save-interval", type=int, default=t.save_interval,
                   help="iterations between checkpoints (0: only at the end)")
    g.add_argument("--keep-last", type=int, default=None,
                   help="keep only the newest N complete checkpoints")
    g.add_argument("--nonfinite-action", choices=NONFINITE_ACTIONS, default=t.nonfinite_action,
                   help="on a NaN/Inf loss or grad norm: stop (the last checkpoint stays the "
                        "newest) or skip the optimizer step")
    g.add_argument("--max-skipped-steps", type=int, default=t.max_skipped_steps,
                   help="with --nonfinite-action skip: stop after this many consecutive "
                        "skipped steps")


def parse_args(argv: list[str] | None = None) -> tuple[PathMoEConfig, TrainingConfig]:
    """Parse and validate; exits with a one-line error naming the flag on bad input."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        resolve_architecture(ns, PathMoEConfig.moe_ffn_hidden_size)
        _resolve_budget(ns)
    except ConfigError as err:
        parser.error(str(err))
    model = dataclass_from_namespace(PathMoEConfig, ns)
    train = dataclass_from_namespace(TrainingConfig, ns)
    train.tokenizer_model = ns.tokenizer_model or ""
    has_tokenizer = spec_from_arguments(ns) is not None
    missing = [flag for flag, value in (("--data-path", ns.data_path or ns.mock_data),
                                        ("--tokenizer-model", has_tokenizer)) if not value]
    if missing and not ns.dry_run:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        _resolve_defaults(ns, train)
        if ns.dry_run:
            world_size = ns.dry_run_world_size or world_size
            model = _dry_run_vocab(model, train, ns.dry_run_vocab_size)
        model = validate(model, train, world_size, check_data=not ns.dry_run)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    train.dry_run_world_size = world_size if ns.dry_run else None
    return model, train


def _resolve_budget(ns: argparse.Namespace) -> None:
    """Megatron-LM's two budgets: iterations with --lr-*-iters, or samples with
    --lr-*-samples (then train_iters = train_samples // global batch); never a mix."""
    samples = ns.train_samples is not None
    if samples and ns.train_iters is not None:
        raise ConfigError("give --train-iters or --train-samples, not both")
    other = "--train-iters" if samples else "--train-samples"
    for flag, given in (("--lr-decay-iters", ns.lr_decay_iters is not None),
                        ("--lr-warmup-iters", ns.lr_warmup_iters not in (None, 0)),
                        ("--lr-wsd-decay-iters", ns.lr_wsd_decay_iters is not None),
                        ("--lr-decay-samples", ns.lr_decay_samples is not None),
                        ("--lr-warmup-samples", ns.lr_warmup_samples != 0),
                        ("--lr-wsd-decay-samples", ns.lr_wsd_decay_samples is not None)):
        if given and flag.endswith("-iters") == samples:
            raise ConfigError(f"{flag} goes with {other}; use the --lr-*-"
                              f"{'samples' if samples else 'iters'} flag instead")
    warmup_given = ns.lr_warmup_iters not in (None, 0) or ns.lr_warmup_samples != 0
    if ns.lr_warmup_fraction is not None and warmup_given:
        raise ConfigError("--lr-warmup-fraction replaces --lr-warmup-iters/--lr-warmup-samples; "
                          "give one of them")
    if ns.rampup_batch_size and not samples:
        raise ConfigError("--rampup-batch-size needs a sample budget (--train-samples), as in "
                          "Megatron-LM: an iteration budget has a fixed global batch")
    if samples:
        if ns.train_samples < ns.global_batch_size:
            raise ConfigError(f"--train-samples {ns.train_samples} is below one global batch "
                              f"(--global-batch-size {ns.global_batch_size})")
        rampup = BatchRampup.from_flag(ns.rampup_batch_size)
        ns.train_iters = GlobalBatchSchedule(ns.global_batch_size, rampup).iterations(
            ns.train_samples)
    elif ns.train_iters is None:
        ns.train_iters = DEFAULT_TRAIN_ITERS
    if ns.lr_warmup_iters is None:
        no_default = samples or ns.lr_warmup_fraction is not None
        ns.lr_warmup_iters = 0 if no_default else DEFAULT_WARMUP_ITERS


def _resolve_defaults(ns: argparse.Namespace, train: TrainingConfig) -> None:
    """Defaults that depend on the machine, and the monitoring flags."""
    from megatron_pathmoe.platform.gpu import default_transformer_impl

    if train.transformer_impl is None:
        train.transformer_impl = default_transformer_impl(train.device)
    train.monitoring = MonitoringConfig.from_args(ns)
    train.cluster = ClusterConfig.from_args(ns)
    validate_cluster(train.cluster)
    train.performance = PerformanceConfig.from_args(ns)
    validate_performance(train.performance, train.use_distributed_optimizer)


def _validate_schedule(train: TrainingConfig) -> None:
    """What megatron-core's OptimizerParamScheduler asserts, as one line naming the flags."""
    unit = "iters" if train.train_samples is None else "samples"
    s = train.lr_schedule()
    if not 0 <= s.warmup_steps < s.decay_steps:
        raise ConfigError(f"LR warmup ({s.warmup_steps:g} {unit}: --lr-warmup-{unit} or "
                          f"--lr-warmup-fraction) must be >= 0 and below the decay length "
                          f"({s.decay_steps} {unit}: --lr-decay-{unit}, default the training "
                          "length)")
    if not 0 <= train.lr_warmup_init <= train.lr or not 0 <= train.min_lr <= train.lr:
        raise ConfigError(f"need 0 <= --min-lr ({train.min_lr}) and --lr-warmup-init "
                          f"({train.lr_warmup_init}) <= --lr ({train.lr})")
    if train.decoupled_min_lr is not None and train.decoupled_lr is None:
        raise ConfigError("--decoupled-min-lr needs --decoupled-lr (the embedding and output "
                          "layer's peak LR)")
    if train.decoupled_lr is not None and not 0 <= (
            train.decoupled_min_lr or 0) <= train.decoupled_lr:
        raise ConfigError(f"need 0 <= --decoupled-min-lr ({train.decoupled_min_lr}) <= "
                          f"--decoupled-lr ({train.decoupled_lr})")
    if train.lr_decay_style == "WSD" and not 0 < (s.wsd_decay_steps or 0) <= s.decay_steps:
        raise ConfigError(f"--lr-decay-style WSD needs --lr-wsd-decay-{unit} between 1 and the "
                          f"decay length ({s.decay_steps} {unit})")
    if train.override_opt_param_scheduler and train.use_checkpoint_opt_param_scheduler:
        raise ConfigError("--override-opt_param-scheduler and --use-checkpoint-opt_param-"
                          "scheduler contradict each other; give one")
    start, end = train.weight_decay_range()
    if not 0 <= start <= end:
        raise ConfigError(f"need 0 <= --start-weight-decay ({start}) <= --end-weight-decay "
                          f"({end})")
    if train.weight_decay_incr_style == "constant" and start != end:
        raise ConfigError("--start-weight-decay and --end-weight-decay differ: pass "
                          "--weight-decay-incr-style linear or cosine")


def _dry_run_vocab(model: PathMoEConfig, train: TrainingConfig,
                   vocab_size: int | None) -> PathMoEConfig:
    """A dry run takes the vocabulary from the tokenizer when given, else from the flag."""
    from megatron_pathmoe.data import load_tokenizer

    if train.tokenizer_model or train.vocab_file or train.vocab_size:
        return model.replace(vocab_size=load_tokenizer(train.tokenizer_spec()).vocab_size)
    if vocab_size is not None and vocab_size > 0:
        return model.replace(vocab_size=vocab_size)
    raise ConfigError("--dry-run needs --tokenizer-model or --dry-run-vocab-size N (the "
                      "tokenizer's vocabulary size) to count the embeddings")


def validate(model: PathMoEConfig, train: TrainingConfig, world_size: int,
             check_data: bool = True) -> PathMoEConfig:
    """Checks that need no process group; returns the resolved model config, its vocabulary
    taken from the tokenizer. ``check_data=False`` (``--dry-run``) skips the data, tokenizer
    and ``--load`` checks."""
    from megatron_pathmoe.data import load_tokenizer, parse_blend
    from megatron_pathmoe.parallel.layout import check_pipeline_schedule

    model = model.validate(world_size)
    dp = train.data_parallel_size(model, world_size)
    if train.global_batch_size % (train.micro_batch_size * dp):
        raise ConfigError(
            f"--global-batch-size {train.global_batch_size} is not divisible by "
            f"--micro-batch-size {train.micro_batch_size} x data-parallel size {dp}")
    schedule = train.batch_schedule()
    schedule.validate_divisible(train.micro_batch_size, dp)
    for size in schedule.sizes():
        check_pipeline_schedule(model, train.num_microbatches(model, world_size, size))
    for flag, value in (("--train-iters", train.train_iters),
                        ("--log-interval", train.log_interval),
                        ("--eval-iters", train.eval_iters)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1")
    _validate_schedule(train)
    if train.save_interval < 0 or (train.keep_last is not None and train.keep_last < 1):
        raise ConfigError("--save-interval must be >= 0 and --keep-last >= 1")
    if train.save_interval and not train.save:
        raise ConfigError("--save-interval needs --save DIR")
    if not check_data:
        return model
    if train.load:
        check_resumable(train.load, model, train.tokenizer_spec(),
                        {name: getattr(train, name) for name in DECOUPLED_LR_FIELDS})
    check_data_sources(train.cluster, train.data_path, train.valid_data_path)
    if train.valid_data_path:
        parse_blend(train.valid_data_path, "--valid-data-path")
    return model.replace(vocab_size=load_tokenizer(train.tokenizer_spec()).vocab_size)
