"""Megatron-LM ``pretrain_gpt.py`` flags that describe a model this project builds one way only.

A Megatron-LM launch script runs with its entry point swapped: the flags that name what
megatron-pathmoe always builds (megatron-core models, SwiGLU, RMSNorm, RoPE, no linear biases,
every layer MoE, no kernel fusions on the local path) are accepted, a value the model cannot
honour fails with one line naming the flag and what is supported, and the Megatron-LM flags
this project does not implement fail with one line saying so (``UNSUPPORTED``; any other
unknown flag still gets argparse's error). Reference: Megatron-LM core_v0.16.1
``megatron/training/arguments.py``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from megatron_pathmoe.config import POSITION_EMBEDDING_CHOICES, ConfigError

PROG = "pathmoe-pretrain"
# The fusions Megatron-LM's --no-*-fusion flags switch off: the local layer spec never fuses.
FUSION_FLAGS = ("--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-swiglu-fusion",
                "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-persist-layer-norm",
                "--no-gradient-accumulation-fusion")


@dataclass(frozen=True)
class Unsupported:
    """A Megatron-LM flag megatron-pathmoe does not implement; ``accepts`` is the one value that
    means "off" and is let through (``--context-parallel-size 1``)."""

    why: str
    accepts: str | None = None


_FP16 = "fp16 loss scaling belongs to --fp16, which is not supported; use --bf16 or fp32"
_FP8 = "FP8/FP4 training needs Transformer Engine recipes not wired here; use --bf16"
_MLA = "multi-latent attention is not built; attention is GQA (--num-query-groups)"
_UNEVEN_PP = ("uneven pipeline stages are not supported; every stage holds --num-layers / PP "
              "layers (use --virtual-pipeline-model-parallel-size to interleave)")
_FSDP = "FSDP is not wired; use --use-distributed-optimizer (sharded Adam states)"
_PRECISION_OPT = "Adam keeps fp32 main weights and moments; precision-aware/offloaded optimizers " \
                 "are not wired"
_CUDA_GRAPH = "CUDA graphs are not wired"
_LAYER = ("the decoder layer is fixed (paper, Appendix B: pre-RMSNorm, SwiGLU, RoPE, no biases "
          "but --add-qkv-bias)")

UNSUPPORTED: dict[str, Unsupported] = {
    "--fp16": Unsupported("fp16 with loss scaling is not implemented; use --bf16 or fp32 (the "
                          "default)"),
    **{flag: Unsupported(_FP16) for flag in ("--loss-scale", "--initial-loss-scale",
                                             "--min-loss-scale", "--loss-scale-window",
                                             "--hysteresis")},
    **{flag: Unsupported(_FP8) for flag in ("--fp8-format", "--fp8-recipe", "--fp8-param-gather",
                                            "--fp4-format")},
    "--use-legacy-models": Unsupported("only megatron-core models are built (--use-mcore-models)"),
    "--spec": Unsupported("the layer spec is megatron-pathmoe's (its routers plug into "
                          "MoESubmodules.router); choose the router with --routing"),
    "--yaml-cfg": Unsupported("give the flags on the command line"),
    "--heterogeneous-layers-config-path": Unsupported("every layer has the same shape"),
    **{flag: Unsupported(_MLA) for flag in ("--multi-latent-attention", "--q-lora-rank",
                                            "--kv-lora-rank", "--qk-head-dim",
                                            "--qk-pos-emb-head-dim", "--v-head-dim")},
    **{flag: Unsupported(_LAYER) for flag in (
        "--apply-layernorm-1p", "--apply-residual-connection-post-layernorm",
        "--apply-query-key-layer-scaling", "--openai-gelu", "--squared-relu",
        "--rotary-interleaved", "--use-rope-scaling", "--rotary-seq-len-interpolation-factor",
        "--no-rope-freq", "--window-size")},
    "--mtp-num-layers": Unsupported("multi-token prediction is not built"),
    "--mtp-loss-scaling-factor": Unsupported("multi-token prediction is not built"),
    "--moe-use-upcycling": Unsupported("upcycling a dense checkpoint is not implemented"),
    "--moe-enable-deepep": Unsupported(
        "the DeepEP (flex) dispatcher is not wired; use --moe-token-dispatcher-type alltoall "
        "or allgather"),
    "--moe-flex-dispatcher-backend": Unsupported(
        "the flex dispatcher is not wired; use --moe-token-dispatcher-type alltoall or "
        "allgather"),
    "--context-parallel-size": Unsupported("context parallelism is not implemented; use 1",
                                           accepts="1"),
    "--cp-comm-type": Unsupported("context parallelism is not implemented"),
    "--hierarchical-context-parallel-sizes": Unsupported(
        "context parallelism is not implemented"),
    "--expert-tensor-parallel-size": Unsupported(
        "experts are never tensor-parallel (gloo cannot all-gather uneven expert inputs); use 1",
        accepts="1"),
    "--tp-comm-overlap": Unsupported("needs Transformer Engine userbuffers; not wired"),
    **{flag: Unsupported(_UNEVEN_PP) for flag in (
        "--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers",
        "--pipeline-model-parallel-layout", "--account-for-embedding-in-pipeline-split",
        "--account-for-loss-in-pipeline-split")},
    **{flag: Unsupported(_FSDP) for flag in ("--use-torch-fsdp2", "--use-megatron-fsdp",
                                             "--use-custom-fsdp",
                                             "--data-parallel-sharding-strategy")},
    "--num-distributed-optimizer-instances": Unsupported(
        "one distributed-optimizer instance per data-parallel group; use 1", accepts="1"),
    **{flag: Unsupported(_PRECISION_OPT) for flag in (
        "--use-precision-aware-optimizer", "--optimizer-cpu-offload", "--main-grads-dtype",
        "--main-params-dtype", "--exp-avg-dtype", "--exp-avg-sq-dtype")},
    "--optimizer": Unsupported("only Adam (decoupled weight decay, megatron's 'adam') is wired; "
                               "use adam", accepts="adam"),
    "--sgd-momentum": Unsupported("only Adam is wired (--optimizer adam)"),
    **{flag: Unsupported(_CUDA_GRAPH) for flag in ("--enable-cuda-graph", "--external-cuda-graph",
                                                   "--cuda-graph-impl", "--cuda-graph-scope")},
    "--attention-backend": Unsupported("the attention implementation follows --transformer-impl",
                                       accepts="auto"),
    "--use-flash-attn": Unsupported("the attention implementation follows --transformer-impl"),
    "--train-data-path": Unsupported("use --data-path (and --split or --valid-data-path)"),
    "--dataloader-type": Unsupported("megatron's single-pass sampler is the one data order",
                                     accepts="single"),
    **{flag: Unsupported("documents are packed with one causal mask; per-document positions "
                         "and attention masks are not wired (--eod-mask-loss is)")
       for flag in ("--reset-position-ids", "--reset-attention-mask")},
    "--ckpt-convert-format": Unsupported("convert checkpoints with python -m "
                                         "megatron_pathmoe.convert"),
    "--moe-input-jitter-eps": Unsupported("input jitter is not wired through the --routing "
                                          "variants"),
    "--moe-router-fusion": Unsupported("the fused router kernel (transformer-engine) is not "
                                       "wired; the --routing variants route in PyTorch"),
    "--overlap-param-gather-with-optimizer-step": Unsupported(
        "the optimizer step does not dispatch the first bucket's all-gather; "
        "--overlap-param-gather overlaps the gathers with the next forward pass"),
    "--distribute-saved-activations": Unsupported(
        "MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel, which "
        "megatron-core forbids with it (sequence parallelism already splits those inputs)"),
    "--vocab-extra-ids": Unsupported("T5 sentinel tokens: the GPT tokenizers here add none; "
                                     "use 0", accepts="0"),
}
# Megatron-LM switches for what this project always does: accepted, nothing to change.
ALWAYS_ON = {
    "--moe-per-layer-logging": "the log and metrics show every layer's aux losses and load",
    "--accumulate-allreduce-grads-in-fp32": "gradients are reduced in fp32",
    "--use-dist-ckpt": "checkpoints are megatron-core dist checkpoints (torch_dist)",
    "--no-create-attention-mask-in-dataloader": "attention is causal either way",
}


class _RefuseUnsupported(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        entry = UNSUPPORTED[self.dest]
        if entry.accepts is not None and values == [entry.accepts]:
            return
        parser.exit(2, f"{PROG}: {self.dest} (Megatron-LM) is not supported by "
                       f"megatron-pathmoe: {entry.why}\n")


def add_unsupported_args(parser: argparse.ArgumentParser) -> None:
    """Register ``UNSUPPORTED`` last, skipping flags another group already implements; they
    are hidden from --help (the README lists them)."""
    for flag in UNSUPPORTED:
        if flag not in parser._option_string_actions:
            parser.add_argument(flag, dest=flag, nargs="*", action=_RefuseUnsupported,
                                help=argparse.SUPPRESS)


def add_architecture_args(parser: argparse.ArgumentParser) -> None:
    """The accepted flags naming what the model always is; ``resolve_architecture`` checks
    their values."""
    g = parser.add_argument_group(
        "architecture (Megatron-LM flags; fixed: megatron-core GPT, pre-RMSNorm, SwiGLU experts, "
        "RoPE, no linear biases, every layer MoE)")
    g.add_argument("--use-mcore-models", action="store_true",
                   help="accepted: megatron-core models are the only kind")
    g.add_argument("--swiglu", action="store_true",
                   help="accepted: experts are always SwiGLU (also without this flag)")
    g.add_argument("--normalization", default="RMSNorm", help="RMSNorm only")
    g.add_argument("--disable-bias-linear", action="store_true",
                   help="accepted: linear layers never have biases (also without this flag)")
    g.add_argument("--no-position-embedding", action="store_false",
                   dest="add_position_embedding",
                   help="accepted: RoPE and 'none' add no learned position table")
    g.add_argument("--moe-layer-freq", default="1",
                   help="1, or a pattern of 1s such as '[1]*8': every layer is MoE")
    g.add_argument(FUSION_FLAGS[0], action="store_true",
                   help=f"accepted, as {', '.join(FUSION_FLAGS[1:])}: the local layers never fuse")
    for flag in FUSION_FLAGS[1:]:
        g.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    for flag, why in ALWAYS_ON.items():
        g.add_argument(flag, action="store_true", help=f"accepted: {why}")
    g.add_argument("--distributed-backend", choices=("nccl", "gloo"), default=None,
                   help="accepted: the backend follows --device (gloo on CPU, nccl on CUDA)")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="layers per virtual pipeline stage (sets "
                        "--virtual-pipeline-model-parallel-size)")
    g.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None,
                   help="same as --virtual-pipeline-model-parallel-size")


def add_shape_args(group: argparse._ArgumentGroup) -> None:
    """The Megatron-LM shape flags that change the model this project builds."""
    group.add_argument("--ffn-hidden-size", type=int, default=None,
                       help="dense FFN width; every layer is MoE, so it only sets the expert "
                            "width when --moe-ffn-hidden-size is not given (Megatron-LM's rule)")
    group.add_argument("--group-query-attention", action="store_true",
                       help="with no --num-query-groups: one KV group (Megatron-LM's default 1)")
    group.add_argument("--kv-channels", type=int, default=None,
                       help="attention head width (default: hidden / heads)")
    group.add_argument("--max-position-embeddings", type=int, default=None,
                       help="longest sequence the RoPE tables cover (default: --seq-length)")
    group.add_argument("--position-embedding-type", default="rope",
                       help=f"{' or '.join(POSITION_EMBEDDING_CHOICES)}")
    group.add_argument("--rotary-percent", type=float, default=1.0,
                       help="fraction of each head's channels RoPE rotates")
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                       help="pad the embedding rows to a multiple of this x TP")
    group.add_argument("--qk-layernorm", action="store_true",
                       help="RMSNorm each query and key head before RoPE (OLMoE, Qwen3-MoE; "
                            "no Qwen2-MoE export)")
    group.add_argument("--add-qkv-bias", action="store_true",
                       help="biases on the query/key/value projections only (Qwen's attention; "
                            "every other linear layer stays bias-free)")


def resolve_architecture(ns: argparse.Namespace, default_moe_ffn: int) -> None:
    """Check the fixed flags and turn Megatron-LM's derived defaults into model fields, in
    place; raises ``ConfigError`` naming the flag."""
    if ns.normalization != "RMSNorm":
        raise ConfigError(f"--normalization {ns.normalization}: megatron-pathmoe builds RMSNorm "
                          "only (paper, Appendix B); pass --normalization RMSNorm")
    if ns.position_embedding_type not in POSITION_EMBEDDING_CHOICES:
        raise ConfigError(f"--position-embedding-type {ns.position_embedding_type}: supported "
                          f"are {' and '.join(POSITION_EMBEDDING_CHOICES)}")
    _check_moe_layer_freq(ns.moe_layer_freq, ns.num_layers)
    if ns.moe_ffn_hidden_size is None:
        ns.moe_ffn_hidden_size = ns.ffn_hidden_size or default_moe_ffn
    if ns.group_query_attention and ns.num_query_groups is None:
        ns.num_query_groups = 1
    ns.virtual_pipeline_model_parallel_size = _virtual_stages(ns)
    if ns.tensor_model_parallel_size == 1:
        ns.sequence_parallel = False  # as Megatron-LM: nothing to split over one TP rank


def _check_moe_layer_freq(text: str, num_layers: int) -> None:
    """Megatron-LM reads an int N (every N-th layer MoE) or a Python list expression."""
    flag = f"--moe-layer-freq {text}"
    try:
        # Megatron-LM evaluates the pattern the same way; no names are reachable from it.
        value = int(text) if "[" not in text else eval(text, {"__builtins__": {}}, {})  # noqa: S307
    except Exception as err:  # any parse error of the user's expression
        raise ConfigError(f"{flag}: not an integer or a list expression ({err})") from None
    pattern = [1 if i % value == 0 else 0 for i in range(num_layers)] if isinstance(value, int) \
        else list(value)
    if len(pattern) != num_layers or any(bit != 1 for bit in pattern):
        raise ConfigError(f"{flag}: megatron-pathmoe builds every one of the {num_layers} layers "
                          "as MoE (routers are shared across consecutive MoE layers); dense "
                          "layers are not supported, use 1")


def _virtual_stages(ns: argparse.Namespace) -> int | None:
    """Megatron-LM's two other spellings of the virtual pipeline size."""
    vpp = ns.virtual_pipeline_model_parallel_size
    if ns.num_virtual_stages_per_pipeline_rank is not None:
        vpp = ns.num_virtual_stages_per_pipeline_rank
    per_stage = ns.num_layers_per_virtual_pipeline_stage
    if per_stage is not None:
        stage_layers = ns.num_layers // ns.pipeline_model_parallel_size
        if per_stage < 1 or stage_layers % per_stage:
            raise ConfigError(f"--num-layers-per-virtual-pipeline-stage {per_stage} must divide "
                              f"the {stage_layers} layers of each pipeline stage")
        vpp = stage_layers // per_stage
    return None if vpp == 1 else vpp  # one chunk per rank is no interleaving
