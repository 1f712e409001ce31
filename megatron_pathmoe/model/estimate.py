"""Parameter counts and a per-rank memory estimate, computed without building the model.

Counts follow the modules ``build_gpt_model`` creates (the unit tests compare them with built
models): word embeddings and the output layer over the padded vocabulary, per layer two RMSNorm
weights (four with ``--qk-layernorm``), fused QKV and output projections (GQA; a QKV bias with ``--add-qkv-bias``), the router
parameters of the routing variant (one copy per tie), E SwiGLU experts and the optional shared
expert (and its gate), plus the final norm. Only the routers come from the routing variant
itself: they are built on the meta device, so any variant counts right.

The memory estimate is megatron's usual accounting: weights in the training dtype, fp32 gradient
buffers (``grad_reduce_in_fp32``), Adam with fp32 main weights and moments (sharded over the
data-parallel ranks with the distributed optimizer), and a rough activation figure
(Korthikanti et al. 2022, adapted to top-k experts, no recomputation).
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from megatron_pathmoe.config import PathMoEConfig
from megatron_pathmoe.model.builder import ParameterCounts

GIB = 1024 ** 3


# --------------------------------------------------------------------------- shapes

def _kv_channels(cfg: PathMoEConfig) -> int:
    return cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads


def attention_parameters(cfg: PathMoEConfig) -> int:
    """Fused QKV (GQA, with ``--add-qkv-bias`` its bias) and output projection of one layer."""
    d = _kv_channels(cfg)
    groups = cfg.num_query_groups or cfg.num_attention_heads
    qkv_rows = d * (cfg.num_attention_heads + 2 * groups)
    qkv = qkv_rows * (cfg.hidden_size + (1 if cfg.add_qkv_bias else 0))
    return qkv + cfg.num_attention_heads * d * cfg.hidden_size


def expert_parameters(cfg: PathMoEConfig) -> int:
    """One SwiGLU expert: fc1 (gate and up) and fc2."""
    return 3 * cfg.hidden_size * cfg.moe_ffn_hidden_size


def qk_norm_parameters(cfg: PathMoEConfig) -> int:
    """One layer's query and key RMSNorm weights (``--qk-layernorm``; replicated over TP)."""
    return 2 * _kv_channels(cfg) if cfg.qk_layernorm else 0


def shared_expert_parameters(cfg: PathMoEConfig) -> tuple[int, int]:
    """One layer's shared expert: (SwiGLU weights, split over TP; its gate, replicated)."""
    size = cfg.moe_shared_expert_intermediate_size or 0
    return 3 * cfg.hidden_size * size, cfg.hidden_size if cfg.moe_shared_expert_gate else 0


def _vocab(cfg: PathMoEConfig) -> int:
    return cfg.padded_vocab_size


@dataclass(frozen=True)
class RouterParameter:
    """One router tensor of the whole model and the global layer numbers that use it."""

    numel: int
    layers: tuple[int, ...]


def router_parameters(cfg: PathMoEConfig) -> list[RouterParameter]:
    """Every router tensor of the model once (ties counted once), from the routing variant's
    own router builder run on the meta device for layers 1..L."""
    from megatron_pathmoe.parallel.ties import TIE_LAYERS_ATTR
    from megatron_pathmoe.routing import build_router_builder

    layout_free = cfg.replace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                              expert_model_parallel_size=1, sequence_parallel=False,
                              virtual_pipeline_model_parallel_size=None)
    transformer_config = layout_free.to_transformer_config()
    builder = build_router_builder(layout_free)
    no_groups = types.SimpleNamespace(tp=None, cp=None, tp_cp=None, tp_dp_cp=None)
    routers = torch.nn.ModuleList()
    with torch.device("meta"):
        for layer in range(1, cfg.num_layers + 1):
            router = builder(config=transformer_config, pg_collection=no_groups)
            router.set_layer_number(layer)
            routers.append(router)
    found: dict[int, RouterParameter] = {}
    for layer, router in enumerate(routers, start=1):
        for param in router.parameters():
            if id(param) not in found:
                found[id(param)] = RouterParameter(
                    param.numel(), tuple(getattr(param, TIE_LAYERS_ATTR, (layer,))))
    return list(found.values())


def count_model_parameters(cfg: PathMoEConfig,
                           routers: list[RouterParameter] | None = None) -> ParameterCounts:
    """Whole-model counts (every tie once): total, active per token, router, expert."""
    routers = router_parameters(cfg) if routers is None else routers
    vocab = _vocab(cfg)
    embeddings = vocab * cfg.hidden_size * (2 if cfg.untie_embeddings_and_output_weights else 1)
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size + cfg.num_layers * qk_norm_parameters(cfg)
    router = sum(r.numel for r in routers)
    expert = cfg.num_layers * cfg.num_experts * expert_parameters(cfg)
    per_layer = attention_parameters(cfg) + sum(shared_expert_parameters(cfg))
    dense = embeddings + norms + cfg.num_layers * per_layer + router
    active = dense + cfg.num_layers * cfg.moe_router_topk * expert_parameters(cfg)
    return ParameterCounts(total=dense + expert, active=active, router=router, expert=expert)


# --------------------------------------------------------------------------- layout

def chunk_layers(cfg: PathMoEConfig, pp_rank: int) -> list[range]:
    """Global 1-based layer numbers of each model chunk of pipeline rank ``pp_rank`` (megatron's
    even split: chunk v of rank p starts at v*L/V + p*L/(P*V))."""
    pp = cfg.pipeline_model_parallel_size
    vpp = cfg.virtual_pipeline_model_parallel_size or 1
    per_chunk = cfg.num_layers // (pp * vpp)
    starts = (v * cfg.num_layers // vpp + pp_rank * per_chunk for v in range(vpp))
    return [range(s + 1, s + per_chunk + 1) for s in starts]


@dataclass(frozen=True)
class RankParameters:
    """Parameters held by one rank of a pipeline stage, split by how they are sharded."""

    dense: int   # sharded over TP, replicated over DP
    expert: int  # E/EP experts, replicated over expert-DP

    @property
    def total(self) -> int:
        return self.dense + self.expert


def rank_parameters(cfg: PathMoEConfig, pp_rank: int,
                    routers: list[RouterParameter]) -> RankParameters:
    """What one rank of pipeline stage ``pp_rank`` holds (tie copies included: each chunk that
    uses a tie holds one)."""
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    chunks = chunk_layers(cfg, pp_rank)
    layers = sum(len(c) for c in chunks)
    vocab_rows = _vocab(cfg) // tp * cfg.hidden_size
    shared, gate = shared_expert_parameters(cfg)
    replicated = gate + 2 * cfg.hidden_size + qk_norm_parameters(cfg)
    dense = layers * ((attention_parameters(cfg) + shared) // tp + replicated)
    dense += sum(r.numel for c in chunks for r in routers if set(r.layers) & set(c))
    if pp_rank == 0:
        dense += vocab_rows
    if pp_rank == pp - 1:
        # The output layer; with tied embeddings on PP > 1 the last stage keeps a copy.
        tied_here = not cfg.untie_embeddings_and_output_weights and pp == 1
        dense += cfg.hidden_size + (0 if tied_here else vocab_rows)
    expert = layers * cfg.num_experts // cfg.expert_model_parallel_size * expert_parameters(cfg)
    return RankParameters(dense=dense, expert=expert)


# --------------------------------------------------------------------------- memory

@dataclass(frozen=True)
class StageMemory:
    pp_rank: int
    layers: list[range]
    params: RankParameters
    weights: float        # bytes
    grads: float
    optimizer: float      # under the chosen optimizer
    optimizer_other: float  # with the other choice (distributed optimizer on <-> off)
    activations: float
    in_flight: float      # micro-batches whose activations are alive at the peak

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


def activation_bytes_per_layer(cfg: PathMoEConfig, micro_batch_size: int,
                               flash_attention: bool) -> float:
    """Rough bytes one layer keeps for backward for one micro-batch on one rank (16-bit
    activations; attention per Korthikanti et al. 2022 (11 sbh + 5 a s^2 b, the s^2 term
    vanishes with flash attention); the MoE block keeps fp32 router logits and probabilities
    and, for each of its top-k copies of a token, the permuted input, the fc1 output
    (gate and up), the SwiGLU output and the fc2 output. Sequence parallelism splits the
    tokens over TP."""
    s, b, h = cfg.seq_length, micro_batch_size, cfg.hidden_size
    tp = cfg.tensor_model_parallel_size
    k, f, e = cfg.moe_router_topk, cfg.moe_ffn_hidden_size, cfg.num_experts
    shared = cfg.moe_shared_expert_intermediate_size or 0
    per_token = 4 * h + 11 * h + 8 * e + k * (2 * h + 4 * f + 2 * f + 2 * h)
    if shared:  # the shared expert's input, fc1 output, SwiGLU output and fc2 output
        per_token += 2 * h + 6 * shared + 2 * h
    attention_scores = 0 if flash_attention else 5 * cfg.num_attention_heads * s
    return s * b * (per_token + attention_scores) / tp


def memory_estimate(cfg: PathMoEConfig, world_size: int, *, micro_batch_size: int,
                    num_microbatches: int, use_distributed_optimizer: bool,
                    flash_attention: bool = False,
                    routers: list[RouterParameter] | None = None) -> list[StageMemory]:
    """Per-rank memory of every pipeline stage (the ranks of one stage hold the same)."""
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    dp = world_size // (tp * pp)
    expert_dp = world_size // (pp * cfg.expert_model_parallel_size)
    vpp = cfg.virtual_pipeline_model_parallel_size or 1
    weight_bytes = 2 if cfg.bf16 else 4
    # Adam moments (8 bytes) plus, for 16-bit training, the fp32 main weights (4 bytes).
    optim_bytes = 12 if cfg.bf16 else 8
    routers = router_parameters(cfg) if routers is None else routers
    per_layer = activation_bytes_per_layer(cfg, micro_batch_size, flash_attention)
    stages = []
    for pp_rank in range(pp):
        params = rank_parameters(cfg, pp_rank, routers)
        full = optim_bytes * params.total
        sharded = optim_bytes * (params.dense / dp + params.expert / expert_dp)
        # 1F1B keeps up to (PP - rank) micro-batches in flight; interleaving adds about
        # (PP-1)/(PP*V) of that (Narayanan et al. 2021).
        in_flight = min(num_microbatches, pp - pp_rank)
        if vpp > 1:
            in_flight *= 1 + (pp - 1) / (pp * vpp)
        layers = sum(len(c) for c in chunk_layers(cfg, pp_rank))
        activations = per_layer * layers * in_flight
        if pp_rank == pp - 1:  # logits: 16-bit output, fp32 copy and its softmax, per TP shard
            activations += (cfg.seq_length * micro_batch_size * _vocab(cfg) / tp) * 10
        stages.append(StageMemory(
            pp_rank=pp_rank, layers=chunk_layers(cfg, pp_rank), params=params,
            weights=weight_bytes * params.total, grads=4 * params.total,
            optimizer=sharded if use_distributed_optimizer else full,
            optimizer_other=full if use_distributed_optimizer else sharded,
            activations=activations, in_flight=in_flight))
    return stages


# --------------------------------------------------------------------------- report

def _billions(n: int) -> str:
    return f"{n:,} ({n / 1e9:.2f}B)" if n >= 1e8 else f"{n:,} ({n / 1e6:.2f}M)"


def _ranges(chunks: list[range]) -> str:
    return ",".join(f"{c.start}-{c.stop - 1}" if len(c) > 1 else str(c.start) for c in chunks)


def format_parameter_report(cfg: PathMoEConfig, counts: ParameterCounts) -> list[str]:
    vocab = _vocab(cfg)
    tied = "untied" if cfg.untie_embeddings_and_output_weights else "tied"
    return [f"parameters: total {_billions(counts.total)} | active per token "
            f"{_billions(counts.active)} | experts {_billions(counts.expert)} | router "
            f"{counts.router:,}",
            f"  vocab {cfg.vocab_size:,} padded to {vocab:,} (TP{cfg.tensor_model_parallel_size}),"
            f" {tied} input/output embeddings"]


def format_memory_report(stages: list[StageMemory], *, use_distributed_optimizer: bool,
                         micro_batch_size: int, flash_attention: bool) -> list[str]:
    other = "without" if use_distributed_optimizer else "with"
    attention = "flash attention" if flash_attention else "unfused attention (s^2 scores)"
    unit, scale = ("GiB", GIB) if max(st.total for st in stages) >= GIB else ("MiB", 1024 ** 2)
    lines = [f"per-rank memory estimate ({unit}; micro-batch {micro_batch_size}, {attention}, "
             "no recomputation; activations are rough):",
             f"  {'stage':>5} {'layers':>12} {'params':>15} {'weights':>8} {'grads':>8} "
             f"{'optim':>8} {'activ':>8} {'in-flight':>9} {'total':>8} "
             f"{'optim ' + other + ' distopt':>22}"]
    for st in stages:
        lines.append(
            f"  {st.pp_rank:>5} {_ranges(st.layers):>12} {st.params.total:>15,} "
            f"{st.weights / scale:>8.2f} {st.grads / scale:>8.2f} {st.optimizer / scale:>8.2f} "
            f"{st.activations / scale:>8.2f} {st.in_flight:>9.2f} {st.total / scale:>8.2f} "
            f"{st.optimizer_other / scale:>22.2f}")
    return lines


def layout_report(cfg: PathMoEConfig, world_size: int, *, micro_batch_size: int,
                  num_microbatches: int, use_distributed_optimizer: bool,
                  flash_attention: bool = False) -> tuple[ParameterCounts, list[StageMemory],
                                                          list[str]]:
    """Whole-model counts, per-stage memory and the lines that report both (startup log and
    ``--dry-run``)."""
    routers = router_parameters(cfg)
    counts = count_model_parameters(cfg, routers)
    stages = memory_estimate(cfg, world_size, micro_batch_size=micro_batch_size,
                             num_microbatches=num_microbatches,
                             use_distributed_optimizer=use_distributed_optimizer,
                             flash_attention=flash_attention, routers=routers)
    lines = format_parameter_report(cfg, counts) + format_memory_report(
        stages, use_distributed_optimizer=use_distributed_optimizer,
        micro_batch_size=micro_batch_size, flash_attention=flash_attention)
    return counts, stages, lines
