"""The declarative key mapping between megatron-core's GPTModel and Hugging Face Qwen2-MoE.

One table, one row per tensor kind. Keys carry two named wildcards: ``{layer}`` (the 0-based
global decoder layer) and ``{expert}`` (the 0-based global expert index). A megatron rank holds
local indices; :mod:`megatron_pathmoe.convert.shards` turns them into global ones
(layer = ``layer_number - 1``, expert = local + EP rank * experts per EP rank) before this table
is applied, and merges tensor-parallel shards along each row's ``tp_dim``.

A row whose megatron tensor fuses several Hugging Face tensors names a :class:`Fusion`:

- ``QKV``: megatron's ``linear_qkv`` stores, per query group, that group's query heads, then
  its key head, then its value head: ``[q_g0 (heads/groups x head_dim), k_g0, v_g0, q_g1, ...]``;
  Hugging Face keeps ``q_proj``/``k_proj``/``v_proj`` separate, heads in order (query head h
  belongs to key/value group h // (heads/groups), matching megatron's ``repeat_interleave``).
- ``GATE_UP``: a SwiGLU ``linear_fc1`` is ``[gate; up]`` along the output dimension.

Both layouts hold per tensor-parallel shard (each shard fuses its own heads / rows), so a
fusion is always split shard by shard and the parts are concatenated afterwards.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from megatron_pathmoe.convert.errors import ConversionError

WILDCARDS = ("layer", "expert")


@dataclass(frozen=True)
class AttentionDims:
    """What splitting a fused QKV needs (for the whole tensor or one TP shard alike)."""

    heads_per_group: int
    head_dim: int


def _split_qkv(fused: torch.Tensor, dims: AttentionDims) -> tuple[torch.Tensor, ...]:
    per_group = (dims.heads_per_group + 2) * dims.head_dim
    if fused.shape[0] % per_group:
        raise ConversionError(f"linear_qkv has {fused.shape[0]} rows, not a multiple of "
                              f"(heads/groups + 2) * head_dim = {per_group}; the model config "
                              "does not match the weights")
    grouped = fused.reshape(-1, dims.heads_per_group + 2, dims.head_dim, fused.shape[-1])
    q = grouped[:, :dims.heads_per_group].reshape(-1, fused.shape[-1])
    k = grouped[:, dims.heads_per_group].reshape(-1, fused.shape[-1])
    v = grouped[:, dims.heads_per_group + 1].reshape(-1, fused.shape[-1])
    return q, k, v


def _merge_qkv(parts: Sequence[torch.Tensor], dims: AttentionDims) -> torch.Tensor:
    q, k, v = parts
    hidden = q.shape[-1]
    groups = k.shape[0] // dims.head_dim
    if q.shape[0] != groups * dims.heads_per_group * dims.head_dim or v.shape != k.shape:
        raise ConversionError(f"q/k/v shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                              f"{tuple(v.shape)} do not fit {groups} query groups of "
                              f"{dims.heads_per_group} heads of size {dims.head_dim}")
    return torch.cat([q.reshape(groups, dims.heads_per_group, dims.head_dim, hidden),
                      k.reshape(groups, 1, dims.head_dim, hidden),
                      v.reshape(groups, 1, dims.head_dim, hidden)], dim=1).reshape(-1, hidden)


def _split_qkv_bias(fused: torch.Tensor, dims: AttentionDims) -> tuple[torch.Tensor, ...]:
    """The 1-D QKV bias in the weight's row layout (per query group: its q heads, k, v)."""
    q, k, v = _split_qkv(fused.unsqueeze(-1), dims)
    return q.squeeze(-1), k.squeeze(-1), v.squeeze(-1)


def _merge_qkv_bias(parts: Sequence[torch.Tensor], dims: AttentionDims) -> torch.Tensor:
    return _merge_qkv([p.unsqueeze(-1) for p in parts], dims).squeeze(-1)


def _split_gate_up(fused: torch.Tensor, dims: AttentionDims) -> tuple[torch.Tensor, ...]:
    if fused.shape[0] % 2:
        raise ConversionError(f"linear_fc1 has an odd number of rows ({fused.shape[0]}); a "
                              "SwiGLU fc1 is [gate; up]")
    return tuple(fused.chunk(2, dim=0))


def _merge_gate_up(parts: Sequence[torch.Tensor], dims: AttentionDims) -> torch.Tensor:
    gate, up = parts
    if gate.shape != up.shape:
        raise ConversionError(f"gate_proj {tuple(gate.shape)} and up_proj {tuple(up.shape)} "
                              "differ in shape")
    return torch.cat([gate, up], dim=0)


@dataclass(frozen=True)
class Fusion:
    """How one megatron tensor splits into several Hugging Face tensors and back."""

    name: str
    split: Callable[[torch.Tensor, AttentionDims], tuple[torch.Tensor, ...]]
    merge: Callable[[Sequence[torch.Tensor], AttentionDims], torch.Tensor]


IDENTITY = Fusion("identity", lambda t, dims: (t,), lambda parts, dims: parts[0])
QKV = Fusion("qkv", _split_qkv, _merge_qkv)
QKV_BIAS = Fusion("qkv_bias", _split_qkv_bias, _merge_qkv_bias)
GATE_UP = Fusion("gate_up", _split_gate_up, _merge_gate_up)


def _pattern_regex(pattern: str) -> re.Pattern:
    regex = re.escape(pattern)
    for name in WILDCARDS:
        regex = regex.replace(re.escape("{" + name + "}"), f"(?P<{name}>\\d+)")
    return re.compile(regex + r"\Z")


@dataclass(frozen=True)
class KeyMapping:
    """One row: a megatron key pattern <-> one Hugging Face key pattern per fused part.

    ``tp_dim``: the dimension megatron splits over tensor-parallel ranks (0: column-parallel and
    vocab-parallel, 1: row-parallel, None: replicated). ``expert_parallel``: the tensor lives in
    expert parallelism (its TP shards follow the expert-tensor-parallel group). ``requires``:
    the model feature (see :func:`expand_rows`) without which the tensor does not exist.
    """

    megatron: str
    hf: tuple[str, ...]
    fusion: Fusion = IDENTITY
    tp_dim: int | None = None
    expert_parallel: bool = False
    requires: str | None = None
    megatron_regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.hf) != (3 if self.fusion in (QKV, QKV_BIAS) else 2 if self.fusion is GATE_UP
                            else 1):
            raise ValueError(f"{self.megatron}: fusion {self.fusion.name} does not fit "
                             f"{len(self.hf)} Hugging Face keys")
        object.__setattr__(self, "megatron_regex", _pattern_regex(self.megatron))

    @property
    def wildcards(self) -> tuple[str, ...]:
        return tuple(name for name in WILDCARDS if "{" + name + "}" in self.megatron)

    def hf_keys(self, **indices: int) -> tuple[str, ...]:
        return tuple(pattern.format(**indices) for pattern in self.hf)

    def megatron_key(self, **indices: int) -> str:
        return self.megatron.format(**indices)


_LAYER = "decoder.layers.{layer}."
_HF_LAYER = "model.layers.{layer}."
_EXPERT = _LAYER + "mlp.experts.local_experts.{expert}."
_HF_EXPERT = _HF_LAYER + "mlp.experts.{expert}."

# The Hugging Face side is the on-disk (hub) layout of Qwen2-MoE checkpoints, which every
# transformers version, vLLM and SGLang read (transformers >= 5 fuses experts at load time).
QWEN2_MOE_TABLE: tuple[KeyMapping, ...] = (
    KeyMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), tp_dim=0),
    KeyMapping(_LAYER + "input_layernorm.weight", (_HF_LAYER + "input_layernorm.weight",)),
    KeyMapping(_LAYER + "self_attention.linear_qkv.weight",
               tuple(_HF_LAYER + f"self_attn.{p}_proj.weight" for p in "qkv"), QKV, tp_dim=0),
    KeyMapping(_LAYER + "self_attention.linear_qkv.bias",
               tuple(_HF_LAYER + f"self_attn.{p}_proj.bias" for p in "qkv"), QKV_BIAS, tp_dim=0,
               requires="qkv_bias"),
    # Per-head query/key RMSNorms (--qk-layernorm; Qwen3-MoE), replicated over TP.
    KeyMapping(_LAYER + "self_attention.q_layernorm.weight",
               (_HF_LAYER + "self_attn.q_norm.weight",), requires="qk_layernorm"),
    KeyMapping(_LAYER + "self_attention.k_layernorm.weight",
               (_HF_LAYER + "self_attn.k_norm.weight",), requires="qk_layernorm"),
    KeyMapping(_LAYER + "self_attention.linear_proj.weight",
               (_HF_LAYER + "self_attn.o_proj.weight",), tp_dim=1),
    KeyMapping(_LAYER + "pre_mlp_layernorm.weight",
               (_HF_LAYER + "post_attention_layernorm.weight",)),
    KeyMapping(_LAYER + "mlp.router.weight", (_HF_LAYER + "mlp.gate.weight",)),
    KeyMapping(_EXPERT + "linear_fc1.weight",
               (_HF_EXPERT + "gate_proj.weight", _HF_EXPERT + "up_proj.weight"), GATE_UP,
               tp_dim=0, expert_parallel=True),
    KeyMapping(_EXPERT + "linear_fc2.weight", (_HF_EXPERT + "down_proj.weight",), tp_dim=1,
               expert_parallel=True),
    # The shared expert (--moe-shared-expert-intermediate-size), tensor-parallel like a dense
    # MLP, and its sigmoid gate (--moe-shared-expert-gate), replicated.
    KeyMapping(_LAYER + "mlp.shared_experts.linear_fc1.weight",
               (_HF_LAYER + "mlp.shared_expert.gate_proj.weight",
                _HF_LAYER + "mlp.shared_expert.up_proj.weight"), GATE_UP, tp_dim=0,
               requires="shared_expert"),
    KeyMapping(_LAYER + "mlp.shared_experts.linear_fc2.weight",
               (_HF_LAYER + "mlp.shared_expert.down_proj.weight",), tp_dim=1,
               requires="shared_expert"),
    KeyMapping(_LAYER + "mlp.shared_experts.gate_weight",
               (_HF_LAYER + "mlp.shared_expert_gate.weight",), requires="shared_expert_gate"),
    KeyMapping("decoder.final_layernorm.weight", ("model.norm.weight",)),
    KeyMapping("output_layer.weight", ("lm_head.weight",), tp_dim=0),
)

OUTPUT_LAYER_KEY = "output_layer.weight"
ROUTER_KEY = _LAYER + "mlp.router.weight"


def match_megatron_key(key: str, table: Sequence[KeyMapping] = QWEN2_MOE_TABLE
                       ) -> tuple[KeyMapping, dict[str, int]]:
    """The row matching a (global) megatron key and its wildcard values."""
    for row in table:
        found = row.megatron_regex.match(key)
        if found:
            return row, {name: int(value) for name, value in found.groupdict().items()}
    raise ConversionError(f"no Hugging Face mapping for megatron tensor {key!r}; the model has "
                          "a module this converter does not know (see "
                          "megatron_pathmoe/convert/mapping.py)")


def expand_rows(table: Sequence[KeyMapping], num_layers: int, num_experts: int,
                tied_embeddings: bool, features: frozenset[str] = frozenset()
                ) -> Iterator[tuple[KeyMapping, dict[str, int]]]:
    """Every (row, wildcard values) a complete model of this shape has; ``features`` names
    the optional tensors it has (``qkv_bias``, ``qk_layernorm``, ``shared_expert``,
    ``shared_expert_gate``)."""
    ranges = {"layer": range(num_layers), "expert": range(num_experts)}
    for row in table:
        if tied_embeddings and row.megatron == OUTPUT_LAYER_KEY:
            continue
        if row.requires is not None and row.requires not in features:
            continue
        for values in itertools.product(*(ranges[name] for name in row.wildcards)):
            yield row, dict(zip(row.wildcards, values))
