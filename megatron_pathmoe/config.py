"""One config object for model, routing and parallel layout.

It is validated before any process group exists (so a bad flag costs a one-line error, not a
torchrun crash on every rank) and maps onto megatron-core's ``TransformerConfig``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from megatron_pathmoe.expert_paths import read_paths_file

# --routing names (paper, Table 1): Indep-MoE, PathB{B}-MoE / PathMoE, Rand-MoE, X-MoE (with
# --path-block-size > 1: PathB{B}X-MoE), Recurrent-MoE, MonoB{B}-MoE, LowRank-MoE.
ROUTING_CHOICES = ("independent", "path", "random", "xmoe", "recurrent", "mono", "lowrank")
# Variants whose routers are shared by blocks of --path-block-size layers, with the block size
# used when the flag is not given (path: the paper's best B=4; xmoe: plain X-MoE).
BLOCK_ROUTING_DEFAULT_BLOCK = {"path": 4, "mono": 4, "xmoe": 1}
SCORE_FUNCTION_CHOICES = ("softmax", "sigmoid")
POSITION_EMBEDDING_CHOICES = ("rope", "none")
DISPATCHER_CHOICES = ("alltoall", "allgather")
# megatron-core 0.16.1's router options (Megatron-LM's --moe-router-* choices that fit here).
# sinkhorn (S-BASE) is not a loss: training selects the top-k of Sinkhorn-balanced scores.
LOAD_BALANCING_CHOICES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none", "sinkhorn")
ROUTER_DTYPE_CHOICES = ("fp32", "fp64")
TOKEN_DROP_POLICY_CHOICES = ("probs", "position")
RECOMPUTE_GRANULARITY_CHOICES = ("full", "selective")
RECOMPUTE_METHOD_CHOICES = ("uniform", "block")
# --recompute-modules that do something in this model: core_attn (attention scores), layernorm
# (the two RMSNorms; transformer-engine only, see _validate_recompute), moe (the whole MoE
# layer, router included), shared_experts (the shared expert, when there is one).
RECOMPUTE_MODULE_CHOICES = ("core_attn", "layernorm", "moe", "shared_experts")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the flag and the fix."""


def dataclass_from_namespace(cls: type, ns: Any) -> Any:
    """``cls`` built from the parsed flags whose names are its fields (argparse's ``dest`` is the
    field name); fields the parser did not define keep their defaults."""
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)
                  if hasattr(ns, f.name)})


@dataclass
class PathMoEConfig:
    # Model shape (paper, Appendix B: RMSNorm, SwiGLU experts, RoPE, GQA).
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # None: multi-head attention; < heads: GQA
    kv_channels: int | None = None  # attention head width; None: hidden / heads
    moe_ffn_hidden_size: int = 256
    seq_length: int = 256
    max_position_embeddings: int | None = None  # None: --seq-length (RoPE has no table)
    vocab_size: int = 4096
    make_vocab_size_divisible_by: int = 128  # embedding rows padded to this x TP
    position_embedding_type: str = "rope"  # rope, or none (no position information)
    rotary_base: int = 10000
    rotary_percent: float = 1.0  # fraction of each head's channels rotated
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02
    untie_embeddings_and_output_weights: bool = True
    add_qkv_bias: bool = False  # biases on the query/key/value projections (Qwen-style)
    qk_layernorm: bool = False  # RMSNorm of each query and key head before RoPE (OLMoE, Qwen3)
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    bf16: bool = False
    # Megatron-LM's --calculate-per-token-loss: the global batch's loss is the sum over its
    # unmasked tokens / their number (not the mean of per-micro-batch means).
    calculate_per_token_loss: bool = False

    # Mixture of experts.
    num_experts: int = 8
    moe_router_topk: int = 2
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: float | None = None
    moe_router_pre_softmax: bool = True  # softmax over all experts, then top-k (paper eq. 3.1-3.2)
    moe_token_dispatcher_type: str = "alltoall"
    moe_router_score_function: str = "softmax"
    # Megatron-core's gate scaling (the selected experts' weights x factor; None: 1) and
    # group-limited routing (experts in num_groups equal groups, each token's top-k taken
    # within its group_topk best groups: device- or node-limited routing).
    moe_router_topk_scaling_factor: float | None = None
    moe_router_num_groups: int | None = None
    moe_router_group_topk: int | None = None
    # Megatron-LM's benchmarking aid: every router routes on random logits (balanced load).
    moe_router_force_load_balancing: bool = False
    # A shared expert (DeepSeek/Qwen-MoE): a SwiGLU MLP of this width every token passes
    # through besides its routed experts (None: none); with the gate its output is scaled by
    # sigmoid(x . w) per token (Qwen2-MoE's shared_expert_gate).
    moe_shared_expert_intermediate_size: int | None = None
    moe_shared_expert_gate: bool = False
    moe_shared_expert_overlap: bool = False  # run it inside the alltoall dispatch (megatron)
    # Aux-loss-free balancing (megatron): a per-expert selection bias moved by
    # moe_router_bias_update_rate towards balance after every global batch; needs sigmoid scores.
    moe_router_enable_expert_bias: bool = False
    moe_router_bias_update_rate: float = 1e-3
    # Megatron-LM's default type: with --moe-aux-loss-coeff 0 (our default) no aux loss, so a
    # positive coefficient alone means aux_loss (the shorthand); 'none' turns any type off.
    moe_router_load_balancing_type: str = "aux_loss"
    # Routing math dtype (Megatron-LM's None, the input dtype, is not offered: bf16 routing).
    moe_router_dtype: str = "fp32"
    # Token dropping (None: dropless). Applied after routing, so it never changes a router's
    # decision, only which routed tokens an expert processes.
    moe_expert_capacity_factor: float | None = None
    moe_pad_expert_input_to_capacity: bool = False
    moe_token_drop_policy: str = "probs"
    # transformer-engine kernels (GPU): grouped expert GEMM, fused permutation.
    moe_grouped_gemm: bool = False
    moe_permute_fusion: bool = False

    # Activation recomputation (megatron-core's TransformerConfig fields).
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    recompute_modules: list[str] | None = None  # selective; None: megatron's ["core_attn"]

    # Routing variant.
    routing: str = "path"
    path_block_size: int | None = None  # None: the variant's default (see block_size)
    xmoe_dim: int = 16  # X-MoE: routing-space dimension
    xmoe_temperature_init: float = 0.07
    xmoe_temperature_min: float = 0.01
    xmoe_temperature_max: float = 1.0
    recurrent_router_dim: int = 128  # Recurrent-MoE: GRU state size r
    lowrank_rank: int = 4  # LowRank-MoE: rank of the per-layer correction (0: shared router)
    moe_path_restriction: str | None = None  # .npy of allowed top-1 expert paths [K, L]
    moe_path_restriction_top_k: int | None = None  # use the K most frequent rows (None: all)

    # Parallel layout.
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False
    # Interleaved (virtual) pipeline: model chunks per pipeline rank; None: plain 1F1B.
    virtual_pipeline_model_parallel_size: int | None = None

    def validate(self, world_size: int | None = None) -> "PathMoEConfig":
        """Raise :class:`ConfigError` naming the offending flag; else return the resolved
        config (the variant's default block size recorded explicitly). ``self`` is left
        unchanged."""
        _require(self.num_layers > 0, "--num-layers must be positive")
        _require(self.hidden_size % self.num_attention_heads == 0,
                 f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads "
                 f"{self.num_attention_heads}; pick heads that divide it")
        groups = self.num_query_groups or self.num_attention_heads
        _require(self.num_attention_heads % groups == 0,
                 f"--num-query-groups {groups} must divide --num-attention-heads "
                 f"{self.num_attention_heads}")
        self._validate_shape()
        _require(self.num_experts >= 1, "--num-experts must be at least 1")
        _require(1 <= self.moe_router_topk <= self.num_experts,
                 f"--moe-router-topk {self.moe_router_topk} must be between 1 and --num-experts "
                 f"{self.num_experts}")
        _require(self.moe_aux_loss_coeff >= 0, "--moe-aux-loss-coeff must be >= 0")
        _require(self.routing in ROUTING_CHOICES,
                 f"--routing {self.routing!r} is unknown; choose one of "
                 f"{', '.join(ROUTING_CHOICES)}")
        _require(self.moe_token_dispatcher_type in DISPATCHER_CHOICES,
                 f"--moe-token-dispatcher-type must be one of {', '.join(DISPATCHER_CHOICES)}")
        self._validate_routing()
        self._validate_capacity()
        self._validate_te_kernels()
        self._validate_recompute()
        self._validate_parallel(world_size)
        return self.replace(path_block_size=self.block_size)

    def _validate_shape(self) -> None:
        """The shape flags beyond layers, width and heads (Megatron-LM's meanings)."""
        _require(self.kv_channels is None or self.kv_channels > 0,
                 "--kv-channels must be positive")
        _require(self.max_position_embeddings is None
                 or self.max_position_embeddings >= self.seq_length,
                 f"--max-position-embeddings {self.max_position_embeddings} is below "
                 f"--seq-length {self.seq_length}; raise it or leave it out")
        _require(self.make_vocab_size_divisible_by >= 1,
                 "--make-vocab-size-divisible-by must be at least 1")
        _require(self.position_embedding_type in POSITION_EMBEDDING_CHOICES,
                 f"--position-embedding-type {self.position_embedding_type}: megatron-pathmoe "
                 f"supports {' and '.join(POSITION_EMBEDDING_CHOICES)} (RoPE: paper, Appendix B)")
        _require(0 < self.rotary_percent <= 1, "--rotary-percent must be in (0, 1]")
        head = self.kv_channels or self.hidden_size // self.num_attention_heads
        rotated = int(head * self.rotary_percent)
        _require(self.position_embedding_type != "rope" or (rotated > 0 and rotated % 2 == 0),
                 f"--rotary-percent {self.rotary_percent} rotates {rotated} of {head} channels "
                 "per head; RoPE needs an even number")

    @property
    def padded_vocab_size(self) -> int:
        """Megatron pads the embedding so every TP shard has the same, aligned number of rows
        (``--make-vocab-size-divisible-by`` x TP)."""
        multiple = self.make_vocab_size_divisible_by * self.tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    @property
    def block_size(self) -> int:
        """Layers per routing block: ``--path-block-size``, else the variant's default."""
        if self.path_block_size is not None:
            return self.path_block_size
        return BLOCK_ROUTING_DEFAULT_BLOCK.get(self.routing, 1)

    @property
    def has_router_blocks(self) -> bool:
        """Whether routers are shared by blocks of layers (path, mono, xmoe)."""
        return self.routing in BLOCK_ROUTING_DEFAULT_BLOCK

    @property
    def router_block_size(self) -> int | None:
        """The block size of a variant with router blocks, None for the others."""
        return self.block_size if self.has_router_blocks else None

    @property
    def routing_label(self) -> str:
        """``path B=4``, ``mono B=2``, ``independent``: the variant as logs and tables name it."""
        block = self.router_block_size
        return f"{self.routing} B={block}" if block else self.routing

    def _validate_routing(self) -> None:
        """The routing variant and its options."""
        _require(self.moe_router_score_function in SCORE_FUNCTION_CHOICES,
                 f"--moe-router-score-function must be one of {', '.join(SCORE_FUNCTION_CHOICES)}")
        self._validate_block_size()
        self._validate_load_balancing()
        self._validate_variant_options()
        self._validate_depth_state()
        if self.moe_path_restriction is not None:
            self._validate_path_restriction()

    def _validate_block_size(self) -> None:
        b = self.block_size
        _require(b >= 1, "--path-block-size must be at least 1")
        _require(self.has_router_blocks or b == 1,
                 f"--path-block-size {b}: --routing {self.routing} has no router blocks; block "
                 f"sizes apply to --routing {', '.join(BLOCK_ROUTING_DEFAULT_BLOCK)}")
        _require(self.num_layers % b == 0,
                 f"--path-block-size {b} does not divide --num-layers {self.num_layers}; use a "
                 f"divisor of {self.num_layers} (e.g. {_divisors(self.num_layers)})")

    def _validate_load_balancing(self) -> None:
        _require(self.moe_z_loss_coeff is None or self.moe_z_loss_coeff >= 0,
                 "--moe-z-loss-coeff must be >= 0")
        _require(not self.moe_router_enable_expert_bias
                 or self.moe_router_score_function == "sigmoid",
                 "--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid "
                 "(megatron-core adds the expert bias to sigmoid scores only)")
        _require(self.moe_router_bias_update_rate > 0,
                 "--moe-router-bias-update-rate must be > 0")
        _require(self.moe_router_topk > 1 or self.moe_router_pre_softmax
                 or self.moe_router_score_function == "sigmoid"
                 or self.moe_router_load_balancing_type == "sinkhorn",
                 "--moe-router-topk 1 with softmax scores needs --moe-router-pre-softmax (a "
                 "softmax over the one selected logit is constant and passes no gradient)")
        _require(self.moe_router_load_balancing_type in LOAD_BALANCING_CHOICES,
                 f"--moe-router-load-balancing-type {self.moe_router_load_balancing_type!r}: "
                 f"choose one of {', '.join(LOAD_BALANCING_CHOICES)}")
        if self.moe_router_load_balancing_type == "sinkhorn":
            self._validate_sinkhorn()
        self._validate_groups()
        self._validate_shared_expert()
        _require(self.moe_router_dtype in ROUTER_DTYPE_CHOICES,
                 f"--moe-router-dtype must be one of {', '.join(ROUTER_DTYPE_CHOICES)}")

    def _validate_sinkhorn(self) -> None:
        """megatron-core's sinkhorn routing scores with its own function (softmax over the
        experts for top-k > 1, sigmoid for top-1) and skips the top-k replay seam."""
        flag = "--moe-router-load-balancing-type sinkhorn"
        _require(self.moe_aux_loss_coeff == 0,
                 f"{flag} balances without an aux loss: leave out --moe-aux-loss-coeff "
                 f"(got {self.moe_aux_loss_coeff})")
        _require(self.moe_router_score_function == "softmax",
                 f"{flag} chooses the score function itself (softmax for top-k > 1, sigmoid "
                 "for top-1): leave out --moe-router-score-function sigmoid")
        _require(self.moe_path_restriction is None,
                 f"{flag} ignores --moe-path-restriction (it selects experts outside "
                 "megatron-core's top-k replay); use another --moe-router-load-balancing-type")
        for other, given in (("--moe-router-topk-scaling-factor",
                              self.moe_router_topk_scaling_factor),
                             ("--moe-router-group-topk", self.moe_router_group_topk)):
            _require(given is None, f"{flag} ignores {other}; leave it out")

    def _validate_shared_expert(self) -> None:
        size, tp = self.moe_shared_expert_intermediate_size, self.tensor_model_parallel_size
        _require(size is None or (size > 0 and size % tp == 0),
                 f"--moe-shared-expert-intermediate-size {size} must be positive and divisible "
                 f"by --tensor-model-parallel-size {tp} (the shared expert is tensor-parallel)")
        _require(size is not None or not self.moe_shared_expert_gate,
                 "--moe-shared-expert-gate needs --moe-shared-expert-intermediate-size")
        _require(not self.moe_shared_expert_overlap or (
                     size is not None and self.moe_token_dispatcher_type == "alltoall"),
                 "--moe-shared-expert-overlap needs --moe-shared-expert-intermediate-size and "
                 "--moe-token-dispatcher-type alltoall (it runs inside that dispatcher)")

    def _validate_groups(self) -> None:
        """Gate scaling and group-limited routing: megatron-core's rules, plus the shapes its
        group top-k needs."""
        factor = self.moe_router_topk_scaling_factor
        _require(factor is None or factor > 0,
                 f"--moe-router-topk-scaling-factor {factor} must be > 0")
        groups, group_topk = self.moe_router_num_groups, self.moe_router_group_topk
        _require(groups is None or (group_topk is not None and groups >= 1),
                 "--moe-router-num-groups needs --moe-router-group-topk (the groups each "
                 "token may use)")
        if group_topk is None:
            return
        _require(groups is not None, "--moe-router-group-topk needs --moe-router-num-groups")
        _require(self.num_experts % groups == 0,
                 f"--moe-router-num-groups {groups} must divide --num-experts "
                 f"{self.num_experts}")
        per_group = self.num_experts // groups
        _require(1 <= group_topk <= groups and group_topk * per_group >= self.moe_router_topk
                 and self.moe_router_topk // group_topk <= per_group,
                 f"--moe-router-group-topk {group_topk}: between 1 and --moe-router-num-groups "
                 f"{groups}, and its groups ({per_group} experts each) must hold "
                 f"--moe-router-topk {self.moe_router_topk} experts")
        _require(self.moe_path_restriction is None,
                 "--moe-path-restriction does not limit its choices to the token's groups; "
                 "leave out --moe-router-group-topk")

    @property
    def renormalises_topk(self) -> bool:
        """Whether the gate weights of the selected experts are renormalised to sum to 1 at
        inference: megatron's top-k without pre-softmax does; pre-softmax and sinkhorn (the
        softmax over all experts, masked) do not."""
        return not self.moe_router_pre_softmax and self.moe_router_load_balancing_type != \
            "sinkhorn"

    def _validate_capacity(self) -> None:
        """Megatron-LM's rules for token dropping."""
        factor = self.moe_expert_capacity_factor
        _require(factor is None or factor > 0,
                 f"--moe-expert-capacity-factor {factor} must be > 0 (leave it out: dropless)")
        _require(self.moe_token_drop_policy in TOKEN_DROP_POLICY_CHOICES,
                 f"--moe-token-drop-policy must be one of {', '.join(TOKEN_DROP_POLICY_CHOICES)}")
        _require(not self.moe_pad_expert_input_to_capacity or factor is not None,
                 "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")

    def _validate_te_kernels(self) -> None:
        """Kernels only transformer-engine provides: refused where it cannot be imported."""
        for flag, on, instead in (
                ("--moe-grouped-gemm", self.moe_grouped_gemm,
                 "leave it out: the local spec runs the experts one GEMM each (SequentialMLP)"),
                ("--moe-permute-fusion", self.moe_permute_fusion,
                 "leave it out: --permute-impl auto (this project's permutation) applies")):
            _require(not on or _transformer_engine_importable(),
                     f"{flag} needs transformer-engine (a GPU machine), which does not import "
                     f"here; {instead}")

    def _validate_recompute(self) -> None:
        """Megatron-LM's recompute rules, plus what routing state across layers allows."""
        gran, method, n = (self.recompute_granularity, self.recompute_method,
                           self.recompute_num_layers)
        _require(gran in (None, *RECOMPUTE_GRANULARITY_CHOICES),
                 "--recompute-granularity must be one of "
                 f"{', '.join(RECOMPUTE_GRANULARITY_CHOICES)}")
        _require(method in (None, *RECOMPUTE_METHOD_CHOICES),
                 f"--recompute-method must be one of {', '.join(RECOMPUTE_METHOD_CHOICES)}")
        if gran == "full":
            _require(method is not None,
                     "--recompute-granularity full needs --recompute-method uniform or block")
            per_stage = self.num_layers // self.pipeline_model_parallel_size
            _require(n is not None and 1 <= n <= per_stage,
                     f"--recompute-granularity full needs --recompute-num-layers between 1 and "
                     f"the {per_stage} layers per pipeline stage")
        else:
            _require(method is None and n is None,
                     "--recompute-method and --recompute-num-layers need "
                     "--recompute-granularity full")
        modules = self.recompute_modules
        if modules is not None:
            _require(gran == "selective",
                     "--recompute-modules needs --recompute-granularity selective")
            bad = [m for m in modules if m not in RECOMPUTE_MODULE_CHOICES]
            _require(not bad,
                     f"--recompute-modules {' '.join(bad)}: not available in this model (moe_act "
                     "needs --moe-grouped-gemm, mlp/mla_up_proj have no module here); choose "
                     f"from {', '.join(RECOMPUTE_MODULE_CHOICES)}")
            _require("shared_experts" not in modules
                     or self.moe_shared_expert_intermediate_size is not None,
                     "--recompute-modules shared_experts needs "
                     "--moe-shared-expert-intermediate-size (there is no shared expert)")
            _require("layernorm" not in modules or _transformer_engine_importable(),
                     "--recompute-modules layernorm needs transformer-engine (megatron-core "
                     "0.16.1's CheckpointWithoutOutput reads TE's FP8 state), which does not "
                     "import here; recompute core_attn and/or moe instead")
        reruns_router = gran == "full" or (gran == "selective" and "moe" in (modules or ()))
        carried = self._routing_state_across_layers()
        _require(not (reruns_router and carried),
                 f"--recompute-granularity {gran}"
                 f"{' --recompute-modules moe' if gran == 'selective' else ''} re-runs the router "
                 f"of single layers, but {carried} hands routing state from layer to layer; "
                 "recompute core_attn/layernorm only (--recompute-granularity selective)")

    def _routing_state_across_layers(self) -> str | None:
        """What makes one layer's routing depend on an earlier layer's forward, if anything."""
        if self.routing == "recurrent":
            return "--routing recurrent (its GRU state)"
        if self.routing == "mono" and self.block_size > 1:
            return "--routing mono (the block's first decision)"
        if self.moe_path_restriction is not None:
            return "--moe-path-restriction (the paths a token can still follow)"
        return None

    def _validate_variant_options(self) -> None:
        _require(self.xmoe_dim >= 1, "--xmoe-dim must be at least 1")
        _require(0 < self.xmoe_temperature_min < self.xmoe_temperature_init
                 < self.xmoe_temperature_max,
                 f"X-MoE temperature: need 0 < --xmoe-temperature-min "
                 f"({self.xmoe_temperature_min}) < --xmoe-temperature-init "
                 f"({self.xmoe_temperature_init}) < --xmoe-temperature-max "
                 f"({self.xmoe_temperature_max})")
        _require(self.recurrent_router_dim >= 1, "--recurrent-router-dim must be at least 1")
        max_rank = min(self.num_experts, self.hidden_size)
        _require(0 <= self.lowrank_rank <= max_rank,
                 f"--lowrank-rank {self.lowrank_rank} must be between 0 (a router shared by all "
                 f"layers) and min(--num-experts, --hidden-size) = {max_rank}")

    def _validate_depth_state(self) -> None:
        """What one layer's router hands to another (a GRU state, a block's decision or its
        expert-bias token counts) must stay on one pipeline stage."""
        pp = self.pipeline_model_parallel_size
        _require(self.routing != "recurrent" or pp == 1,
                 "--routing recurrent needs --pipeline-model-parallel-size 1: its GRU state runs "
                 "from each layer's router to the next one and would have to cross pipeline "
                 "stages with the activations, which is not implemented")
        chunks = pp * (self.virtual_pipeline_model_parallel_size or 1)
        per_chunk = self.num_layers // max(chunks, 1)
        _require(self.routing != "mono" or per_chunk % self.block_size == 0,
                 f"--routing mono --path-block-size {self.block_size}: a block would span "
                 f"pipeline stages of {per_chunk} layers, but its first layer's routing decision "
                 "cannot cross stages; use a block size that divides the layers per stage")
        _require(not self.moe_router_enable_expert_bias or per_chunk % self.block_size == 0,
                 f"--moe-router-enable-expert-bias with --path-block-size {self.block_size}: a "
                 f"block spans pipeline stages of {per_chunk} layers, and its shared expert bias "
                 "would need the token counts of every stage (not implemented); use a block "
                 "size that divides the layers per stage")

    def _validate_path_restriction(self) -> None:
        flag = f"--moe-path-restriction {self.moe_path_restriction}"
        _require(self.routing != "mono",
                 f"{flag}: --routing mono reuses each block's first decision, so a path cannot "
                 "be enforced layer by layer; restrict a path or independent model instead")
        _require(self.pipeline_model_parallel_size == 1,
                 f"{flag} needs --pipeline-model-parallel-size 1: the set of paths a token can "
                 "still follow runs from layer to layer and cannot cross pipeline stages yet")
        try:
            paths = read_paths_file(self.moe_path_restriction, self.num_layers,
                                    self.num_experts).paths
        except (OSError, ValueError) as err:
            raise ConfigError(f"{flag}: {err}") from None
        top_k = self.moe_path_restriction_top_k
        _require(top_k is None or 1 <= top_k <= len(paths),
                 f"--moe-path-restriction-top-k {top_k} must be between 1 and the {len(paths)} "
                 f"paths in {self.moe_path_restriction}")

    def _validate_parallel(self, world_size: int | None) -> None:
        tp, pp, ep = (self.tensor_model_parallel_size, self.pipeline_model_parallel_size,
                      self.expert_model_parallel_size)
        _require(min(tp, pp, ep) >= 1, "parallel sizes must be >= 1")
        _require(self.num_experts % ep == 0,
                 f"--num-experts {self.num_experts} is not divisible by "
                 f"--expert-model-parallel-size {ep}; use an EP size that divides the experts")
        _require(self.num_layers % pp == 0,
                 f"--num-layers {self.num_layers} is not divisible by "
                 f"--pipeline-model-parallel-size {pp}")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            _require(vpp >= 1 and pp > 1,
                     "--virtual-pipeline-model-parallel-size needs "
                     "--pipeline-model-parallel-size > 1 (it interleaves pipeline stages)")
            _require(self.num_layers % (pp * vpp) == 0,
                     f"--num-layers {self.num_layers} is not divisible by pipeline size {pp} x "
                     f"virtual pipeline size {vpp}; every model chunk needs the same number "
                     "of layers")
        _require(self.num_attention_heads % tp == 0 and
                 (self.num_query_groups or self.num_attention_heads) % tp == 0,
                 f"--tensor-model-parallel-size {tp} must divide the attention heads and "
                 "query groups")
        _require(tp == 1 or self.sequence_parallel,
                 "MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel")
        _require(tp > 1 or not self.sequence_parallel,
                 "--sequence-parallel needs --tensor-model-parallel-size > 1")
        if world_size is not None:
            _require(world_size % (tp * pp) == 0,
                     f"world size {world_size} is not divisible by TP*PP = {tp * pp}; launch a "
                     "multiple of it with torchrun --nproc_per_node/--nnodes")
            dp = world_size // (tp * pp)
            _require((dp * tp) % ep == 0,
                     f"--expert-model-parallel-size {ep} must divide DP*TP = {dp * tp} "
                     f"(world size {world_size})")

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def to_transformer_config(self) -> Any:
        """The megatron-core ``TransformerConfig`` for this model."""
        from megatron.core.transformer.transformer_config import TransformerConfig

        return TransformerConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels,
            ffn_hidden_size=self.moe_ffn_hidden_size,
            normalization="RMSNorm",
            layernorm_epsilon=self.norm_epsilon,
            gated_linear_unit=True,
            activation_func=torch.nn.functional.silu,
            add_bias_linear=False,
            add_qkv_bias=self.add_qkv_bias,
            qk_layernorm=self.qk_layernorm,
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            apply_rope_fusion=False,
            persist_layer_norm=False,
            gradient_accumulation_fusion=False,
            attention_dropout=self.attention_dropout,
            hidden_dropout=self.hidden_dropout,
            calculate_per_token_loss=self.calculate_per_token_loss,
            init_method_std=self.init_method_std,
            bf16=self.bf16,
            params_dtype=self.params_dtype,
            pipeline_dtype=self.params_dtype,
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            expert_model_parallel_size=self.expert_model_parallel_size,
            # Experts are never tensor-parallel: alltoall with expert-TP > 1 fails on gloo, and
            # experts this small gain nothing from it.
            expert_tensor_parallel_size=1,
            sequence_parallel=self.sequence_parallel,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline_model_parallel_size,
            # As Megatron-LM: the interleaved schedule overlaps unbatched p2p ops. Batched ops
            # mismatch at PP=2, where the previous and the next stage are the same rank.
            overlap_p2p_comm=self.virtual_pipeline_model_parallel_size is not None,
            batch_p2p_comm=self.virtual_pipeline_model_parallel_size is None,
            num_moe_experts=self.num_experts,
            moe_ffn_hidden_size=self.moe_ffn_hidden_size,
            moe_router_topk=self.moe_router_topk,
            moe_router_pre_softmax=self.moe_router_pre_softmax,
            moe_router_topk_scaling_factor=self.moe_router_topk_scaling_factor,
            moe_router_num_groups=self.moe_router_num_groups,
            moe_router_group_topk=self.moe_router_group_topk,
            moe_router_force_load_balancing=self.moe_router_force_load_balancing,
            moe_shared_expert_intermediate_size=self.moe_shared_expert_intermediate_size,
            moe_shared_expert_gate=self.moe_shared_expert_gate,
            moe_shared_expert_overlap=self.moe_shared_expert_overlap,
            moe_router_load_balancing_type=self.moe_router_load_balancing_type,
            moe_aux_loss_coeff=self.moe_aux_loss_coeff,
            moe_z_loss_coeff=self.moe_z_loss_coeff,
            moe_token_dispatcher_type=self.moe_token_dispatcher_type,
            moe_router_score_function=self.moe_router_score_function,
            moe_router_enable_expert_bias=self.moe_router_enable_expert_bias,
            moe_router_bias_update_rate=self.moe_router_bias_update_rate,
            moe_router_dtype=self.moe_router_dtype,
            moe_expert_capacity_factor=self.moe_expert_capacity_factor,
            moe_pad_expert_input_to_capacity=self.moe_pad_expert_input_to_capacity,
            moe_token_drop_policy=self.moe_token_drop_policy,
            moe_grouped_gemm=self.moe_grouped_gemm,
            moe_permute_fusion=self.moe_permute_fusion,
            recompute_granularity=self.recompute_granularity,
            recompute_method=self.recompute_method,
            recompute_num_layers=self.recompute_num_layers,
            recompute_modules=(list(self.recompute_modules)
                               if self.recompute_modules is not None else None),
            moe_router_fusion=False,
            # Per-layer logging needs a layer number; keep megatron's own tracker.
            moe_per_layer_logging=True,
        )

    def replace(self, **changes: Any) -> "PathMoEConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _transformer_engine_importable() -> bool:
    from megatron_pathmoe.platform.gpu import transformer_engine_importable

    return transformer_engine_importable()


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
