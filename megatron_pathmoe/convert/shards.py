"""From a megatron model (one rank's shard of any TP/EP/PP layout) to the canonical state dict.

Each rank turns its ``state_dict`` into *pieces*: keys with global layer and expert indices
(layer = ``layer_number - 1``; expert = local + EP rank x experts per EP rank), every layer's
router as a standard gate weight, each tagged with its tensor-parallel rank. Pieces from all
ranks merge into one world-1 state dict by concatenating TP shards along the mapping table's
``tp_dim`` (split per shard first where a tensor fuses several, see ``mapping.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch

from megatron_pathmoe.config import PathMoEConfig
from megatron_pathmoe.convert import qwen2_moe
from megatron_pathmoe.convert.converter import EXTRA_STATE_SUFFIX
from megatron_pathmoe.convert.errors import ConversionError
from megatron_pathmoe.convert.mapping import (
    IDENTITY,
    OUTPUT_LAYER_KEY,
    ROUTER_KEY,
    match_megatron_key,
)

_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


@dataclass(frozen=True)
class Piece:
    """One rank's part of one canonical tensor."""

    key: str
    tp_rank: int
    tp_size: int
    tensor: torch.Tensor


def router_gate_weight(router: torch.nn.Module, layer: int, dtype: torch.dtype) -> torch.Tensor:
    """The exact standard-gate weight [E, H] of a router, in the model's ``dtype``.

    ``export_gate_weight()`` is the single source of truth: each routing variant implements it
    (materialising e.g. a low-rank correction) or raises ``RoutingExportError`` naming the
    variant. Only megatron's plain ``TopKRouter`` lacks it, and is a standard gate already.
    """
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_pathmoe.routing import RoutingExportError

    export = getattr(router, "export_gate_weight", None)
    if export is None:
        if type(router) is not TopKRouter:
            raise ConversionError(f"router {type(router).__name__} of layer {layer} has no "
                                  "export_gate_weight(); it cannot be written as a standard gate")
        return router.weight.detach().to(dtype)
    try:
        return export().detach().to(dtype)
    except RoutingExportError as err:
        raise ConversionError(f"layer {layer} has no exact Hugging Face (Qwen2-MoE) gate: "
                              f"{err}") from err


def _globalise(key: str, layer_numbers: list[int], expert_offset: int) -> str:
    found = _LOCAL_LAYER.match(key)
    if found:
        key = f"decoder.layers.{layer_numbers[int(found.group(1))] - 1}." + key[found.end():]
        key = _LOCAL_EXPERT.sub(lambda m: f".local_experts.{int(m.group(1)) + expert_offset}.",
                                key)
    return key


def local_pieces(model: torch.nn.Module, cfg: PathMoEConfig) -> list[Piece]:
    """This rank's pieces (needs the megatron parallel state the model was built under)."""
    from megatron.core import parallel_state as ps

    tp = (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())
    etp = (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size())
    expert_offset = ps.get_expert_model_parallel_rank() * (
        cfg.num_experts // ps.get_expert_model_parallel_world_size())
    layers = list(getattr(model, "decoder").layers)
    layer_numbers = [layer.layer_number for layer in layers]
    pieces = []
    for key, tensor in model.state_dict().items():
        if key.endswith(EXTRA_STATE_SUFFIX) or ".mlp.router." in key:
            continue
        if key == OUTPUT_LAYER_KEY and not cfg.untie_embeddings_and_output_weights:
            continue  # the last stage's copy of a tied embedding
        key = _globalise(key, layer_numbers, expert_offset)
        rank, size = etp if match_megatron_key(key)[0].expert_parallel else tp
        pieces.append(Piece(key, rank, size, tensor.detach()))
    for layer in layers:
        gate = router_gate_weight(layer.mlp.router, layer.layer_number - 1, cfg.params_dtype)
        pieces.append(Piece(ROUTER_KEY.format(layer=layer.layer_number - 1), tp[0], tp[1], gate))
    return pieces


def merge_pieces(pieces: Iterable[Piece], cfg: PathMoEConfig) -> dict[str, torch.Tensor]:
    """The canonical world-1 state dict from every rank's pieces (replicas must agree)."""
    by_key: dict[str, dict[int, Piece]] = {}
    for piece in pieces:
        shards = by_key.setdefault(piece.key, {})
        seen = shards.setdefault(piece.tp_rank, piece)
        if seen is not piece and not torch.equal(seen.tensor, piece.tensor):
            raise ConversionError(f"replicas of {piece.key} (TP rank {piece.tp_rank}) differ "
                                  "between ranks; the checkpoint is inconsistent")
    return {key: _merge_tp(key, shards, cfg) for key, shards in sorted(by_key.items())}


def _merge_tp(key: str, shards: dict[int, Piece], cfg: PathMoEConfig) -> torch.Tensor:
    row, _ = match_megatron_key(key)
    size = next(iter(shards.values())).tp_size
    if row.tp_dim is None or size == 1:
        return shards[min(shards)].tensor
    if sorted(shards) != list(range(size)):
        raise ConversionError(f"{key}: TP shards {sorted(shards)} of {size} were gathered")
    dims = qwen2_moe.attention_dims(cfg)
    split = [row.fusion.split(shards[r].tensor, dims) for r in range(size)]
    parts = [torch.cat([s[i] for s in split], dim=row.tp_dim) for i in range(len(split[0]))]
    return parts[0] if row.fusion is IDENTITY else row.fusion.merge(parts, dims)


def canonical_state(model: torch.nn.Module, cfg: PathMoEConfig) -> dict[str, torch.Tensor]:
    """The canonical state dict of a model, gathered from every rank onto rank 0 when the world
    is larger than one (other ranks get an empty dict)."""
    import torch.distributed as dist

    pieces = local_pieces(model, cfg)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return merge_pieces(pieces, cfg)
    gathered: list = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(pieces, gathered, dst=0)
    if dist.get_rank() != 0:
        return {}
    return merge_pieces((p for rank_pieces in gathered for p in rank_pieces), cfg)
