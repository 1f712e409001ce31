"""The converter's core: pure functions between a world-1 megatron state dict and a Hugging Face
Qwen2-MoE state dict. No process group, file or model object is involved.

The megatron side is *canonical*: global layer and expert indices, tensor-parallel shards
merged, and a ``decoder.layers.<l>.mlp.router.weight`` for EVERY layer (a block-shared router
appears once per layer; :func:`tie_block_routers` folds the copies back into one per block).
"""

from __future__ import annotations

from typing import Mapping

import torch

from megatron_pathmoe.config import PathMoEConfig
from megatron_pathmoe.convert import qwen2_moe
from megatron_pathmoe.convert.errors import ConversionError
from megatron_pathmoe.convert.mapping import (
    QWEN2_MOE_TABLE,
    ROUTER_KEY,
    expand_rows,
    match_megatron_key,
)

EXTRA_STATE_SUFFIX = "._extra_state"


def _expected_rows(cfg: PathMoEConfig):
    features = {"qkv_bias": cfg.add_qkv_bias, "qk_layernorm": cfg.qk_layernorm,
                "shared_expert": cfg.moe_shared_expert_intermediate_size is not None,
                "shared_expert_gate": cfg.moe_shared_expert_gate}
    return expand_rows(QWEN2_MOE_TABLE, cfg.num_layers, cfg.num_experts,
                       tied_embeddings=not cfg.untie_embeddings_and_output_weights,
                       features=frozenset(name for name, on in features.items() if on))


def _missing(keys: list[str], what: str, hint: str) -> ConversionError:
    shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
    return ConversionError(f"{len(keys)} {what} missing: {shown}; {hint}")


def megatron_to_hf(state: Mapping[str, torch.Tensor], cfg: PathMoEConfig
                   ) -> dict[str, torch.Tensor]:
    """Canonical megatron state dict -> Qwen2-MoE state dict (the hub's on-disk key layout)."""
    qwen2_moe.check_exportable(cfg)
    tensors = {k: v for k, v in state.items() if not k.endswith(EXTRA_STATE_SUFFIX)}
    expected = {row.megatron_key(**idx) for row, idx in _expected_rows(cfg)}
    missing = sorted(expected - set(tensors))
    if missing:
        raise _missing(missing, "megatron tensors", "a block-shared router must be expanded to "
                       "every layer first (convert.shards.canonical_state does it)")
    dims = qwen2_moe.attention_dims(cfg)
    hf: dict[str, torch.Tensor] = {}
    dtype = None
    for key, tensor in tensors.items():
        row, idx = match_megatron_key(key)
        if key not in expected:
            raise ConversionError(f"megatron tensor {key!r} is outside the model shape "
                                  f"({cfg.num_layers} layers, {cfg.num_experts} experts)")
        for hf_key, part in zip(row.hf_keys(**idx), row.fusion.split(tensor.detach(), dims)):
            hf[hf_key] = part.clone()  # own storage: safetensors refuses shared tensors
        dtype = tensor.dtype
    hf.update(qwen2_moe.hf_only_tensors(cfg, dtype or cfg.params_dtype))
    return hf


def hf_to_megatron(hf_state: Mapping[str, torch.Tensor], cfg: PathMoEConfig,
                   source: str = "the Hugging Face model") -> dict[str, torch.Tensor]:
    """Qwen2-MoE state dict -> canonical megatron state dict (one router weight per layer)."""
    remaining = dict(hf_state)
    qwen2_moe.pop_hf_only_tensors(remaining, cfg)
    if not cfg.untie_embeddings_and_output_weights:
        _drop_tied_head(remaining, source)
    dims = qwen2_moe.attention_dims(cfg)
    state: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for row, idx in _expected_rows(cfg):
        keys = row.hf_keys(**idx)
        parts = [remaining.pop(k, None) for k in keys]
        if any(p is None for p in parts):
            missing.extend(k for k, p in zip(keys, parts) if p is None)
            continue
        state[row.megatron_key(**idx)] = row.fusion.merge(parts, dims).contiguous()
    if missing:
        raise _missing(sorted(missing), f"tensors of {source}",
                       "is it a complete Qwen2-/Qwen3-MoE checkpoint of the shape config.json "
                       "states?")
    if remaining:
        raise ConversionError(f"{source} has tensors PathMoE has no place for: "
                              f"{sorted(remaining)[:5]}; it is not a PathMoE-compatible "
                              "Qwen2-/Qwen3-MoE")
    return state


def _drop_tied_head(remaining: dict[str, torch.Tensor], source: str) -> None:
    head = remaining.pop("lm_head.weight", None)
    embed = remaining.get("model.embed_tokens.weight")
    if head is not None and embed is not None and not torch.equal(head, embed):
        raise ConversionError(f"{source}: tie_word_embeddings is true but lm_head.weight differs "
                              "from model.embed_tokens.weight")


def tie_block_routers(state: Mapping[str, torch.Tensor], cfg: PathMoEConfig,
                      source: str = "the Hugging Face model") -> dict[str, torch.Tensor]:
    """Keep one router weight per routing block (the block's first layer owns it, as in
    ``BlockSharedRouter``), after checking every copy is bitwise equal to it."""
    tied = dict(state)
    for block in qwen2_moe.router_blocks(cfg):
        owner_key = ROUTER_KEY.format(layer=block[0])
        owner = tied[owner_key]
        for layer in block[1:]:
            copy = tied.pop(ROUTER_KEY.format(layer=layer))
            if not torch.equal(copy, owner):
                diff = (copy.float() - owner.float()).abs().max().item()
                raise ConversionError(
                    f"{source}: model.layers.{layer}.mlp.gate.weight differs from "
                    f"model.layers.{block[0]}.mlp.gate.weight (max |diff| {diff:.3g}), but "
                    f"layers {block[0]}-{block[-1]} share one router (path routing, block size "
                    f"{len(block)}); the copies were changed after export. Import with "
                    "--routing independent to keep one gate per layer")
    return tied
