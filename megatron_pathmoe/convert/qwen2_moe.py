"""The Hugging Face side: Qwen2-MoE (``Qwen2MoeForCausalLM``), config and exactness checks.

Why Qwen2-MoE. It is the one standard transformers MoE decoder (loaded by
``AutoModelForCausalLM`` without ``trust_remote_code``, and by vLLM/SGLang) whose computation
equals ours exactly for BOTH router settings:

- router: softmax over all experts, then top-k, and ``norm_topk_prob`` switches renormalising
  the top-k weights. ``norm_topk_prob=False`` is megatron's ``moe_router_pre_softmax=True`` (the
  paper's eq. 3.1-3.2, no renormalisation); ``norm_topk_prob=True`` is megatron's
  ``pre_softmax=False`` (softmax over the top-k logits = renormalised top-k probabilities).
  A model trained with ``sinkhorn`` routing (top-k > 1) infers as ``pre_softmax=True``: the
  Sinkhorn balancing only chooses the experts during training.
- attention: no q/k norms; ``qkv_bias`` follows ``--add-qkv-bias`` (Qwen's biased q/k/v); GQA via
  ``num_key_value_heads``; RoPE with the same rotate-half (non-interleaved) layout and inverse
  frequencies as megatron's ``RotaryEmbedding``; RMSNorm everywhere; SwiGLU experts.
- the shared expert: a model without one (``--moe-shared-expert-intermediate-size``) exports
  ``shared_expert_intermediate_size=0`` (zero-size tensors: its output is exactly 0 and adding it
  changes nothing); one with it maps onto ``mlp.shared_expert`` and ``mlp.shared_expert_gate``,
  which needs megatron's gate (``--moe-shared-expert-gate``: sigmoid(x . w) scales it, as
  Qwen2-MoE's gate does).

The others are not exact: Qwen3-MoE, OLMoE and FlexOlmo apply q/k RMSNorms (not the identity
even with unit weights); Mixtral always renormalises the top-k (it matches only
``pre_softmax=False``); Granite-MoE and Ernie-4.5-MoE add multipliers or renormalisation
clamps; DeepSeek/GLM use sigmoid or grouped routing.

A model with per-head query/key norms (``--qk-layernorm``) exports as Qwen3-MoE instead
(``Qwen3MoeForCausalLM``): the same router, experts and RoPE, plus ``self_attn.q_norm`` /
``k_norm`` (RMSNorm over the head dimension before RoPE, as megatron's q/k_layernorm), and no
shared expert or q/k/v-only bias (its ``attention_bias`` also biases o_proj).

A routing block of a PathMoE model (one router weight for B layers) is written into every
layer's ``mlp.gate.weight``, which is exact for inference. The block structure is recorded in
``config.json`` under :data:`METADATA_KEY` so the way back restores the tie, after checking that
the copies are still bitwise equal.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from megatron_pathmoe.config import PathMoEConfig
from megatron_pathmoe.convert.errors import ConversionError
from megatron_pathmoe.convert.mapping import AttentionDims

ARCHITECTURE = "Qwen2MoeForCausalLM"
MODEL_TYPE = "qwen2_moe"
QWEN3_ARCHITECTURE = "Qwen3MoeForCausalLM"
QWEN3_MODEL_TYPE = "qwen3_moe"
# Config fields only Qwen2-MoE has (a Qwen3-MoE config.json leaves them out).
_QWEN2_ONLY = ("shared_expert_intermediate_size", "qkv_bias")
METADATA_KEY = "pathmoe"
METADATA_VERSION = 1
# Routing variants whose router is the standard per-layer gate (possibly shared by a block).
IMPORTABLE_ROUTING = ("independent", "path")
# PathMoEConfig fields describing only how a run was laid out or trained: reset on import.
_WORLD1_LAYOUT = dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                      expert_model_parallel_size=1, sequence_parallel=False,
                      virtual_pipeline_model_parallel_size=None)


def attention_dims(cfg: PathMoEConfig) -> AttentionDims:
    groups = cfg.num_query_groups or cfg.num_attention_heads
    return AttentionDims(heads_per_group=cfg.num_attention_heads // groups,
                         head_dim=cfg.hidden_size // cfg.num_attention_heads)


def hf_architecture(cfg: PathMoEConfig) -> tuple[str, str]:
    """(architecture, model_type) of the export: Qwen3-MoE with per-head q/k norms, else
    Qwen2-MoE."""
    if cfg.qk_layernorm:
        return QWEN3_ARCHITECTURE, QWEN3_MODEL_TYPE
    return ARCHITECTURE, MODEL_TYPE


def tied_block_size(cfg: PathMoEConfig) -> int:
    """Layers sharing one gate weight: the block size for path routing, else 1."""
    return cfg.block_size if cfg.routing == "path" else 1


def router_blocks(cfg: PathMoEConfig) -> list[list[int]]:
    """0-based layers that share one router weight, block by block."""
    size = tied_block_size(cfg)
    return [list(range(start, start + size)) for start in range(0, cfg.num_layers, size)]


def check_exportable(cfg: PathMoEConfig) -> None:
    """Refuse routing options a Qwen2-MoE gate cannot reproduce (the router variants' own
    limits are reported by their ``export_gate_weight``)."""
    score = cfg.moe_router_score_function
    if score != "softmax":
        raise ConversionError(f"--moe-router-score-function {score}: Qwen2-MoE routes with a "
                              "softmax; a sigmoid-scored model has no exact Hugging Face export")
    if cfg.moe_router_load_balancing_type == "sinkhorn" and cfg.moe_router_topk == 1:
        raise ConversionError("--moe-router-load-balancing-type sinkhorn with --moe-router-topk "
                              "1 gates with a sigmoid; Qwen2-MoE routes with a softmax, so "
                              "this model has no exact Hugging Face export")
    if cfg.moe_shared_expert_intermediate_size is not None and not cfg.moe_shared_expert_gate:
        raise ConversionError("--moe-shared-expert-intermediate-size without "
                              "--moe-shared-expert-gate: Qwen2-MoE always scales its shared "
                              "expert by a sigmoid gate, so this model has no exact Hugging "
                              "Face export")
    if cfg.qk_layernorm:  # Qwen3-MoE
        for flag, given in (("--add-qkv-bias", cfg.add_qkv_bias),
                            ("--moe-shared-expert-intermediate-size",
                             cfg.moe_shared_expert_intermediate_size is not None)):
            if given:
                raise ConversionError(
                    f"--qk-layernorm with {flag}: query/key norms export as Qwen3-MoE, which "
                    "has no shared expert and biases o_proj whenever it biases q/k/v; this "
                    "model has no exact Hugging Face export")
    if cfg.moe_router_force_load_balancing:
        raise ConversionError("--moe-router-force-load-balancing: the model routed on random "
                              "logits (a benchmarking aid); its gates mean nothing to export")
    for flag, given in (("--moe-router-topk-scaling-factor",
                         cfg.moe_router_topk_scaling_factor not in (None, 1.0)),
                        ("--moe-router-group-topk", cfg.moe_router_group_topk is not None)):
        if given:
            raise ConversionError(f"{flag}: Qwen2-MoE's gate has no scaling and no "
                                  "group-limited top-k; this model has no exact Hugging Face "
                                  "export")
    head = cfg.hidden_size // cfg.num_attention_heads
    for flag, value, hf in (("--kv-channels", cfg.kv_channels or head, head),
                            ("--rotary-percent", cfg.rotary_percent, 1.0),
                            ("--position-embedding-type", cfg.position_embedding_type, "rope")):
        if value != hf:
            raise ConversionError(f"{flag} {value}: Qwen2-MoE has heads of hidden / heads "
                                  f"channels with RoPE on all of them; export needs {flag} {hf}")
    if cfg.moe_path_restriction:
        raise ConversionError(f"--moe-path-restriction {cfg.moe_path_restriction}: restricting "
                              "expert paths at inference has no Hugging Face equivalent; export "
                              "the unrestricted model")


def pathmoe_metadata(cfg: PathMoEConfig, iteration: int | None,
                     tokenizer: dict | None = None) -> dict:
    """What ``config.json`` records so HF -> Megatron restores the PathMoE model (and its
    tokenizer, see ``convert/tokenizer.py``)."""
    return {"format_version": METADATA_VERSION, "routing": cfg.routing, "tokenizer": tokenizer,
            "path_block_size": tied_block_size(cfg),
            "router_blocks": router_blocks(cfg),
            "moe_router_pre_softmax": cfg.moe_router_pre_softmax,
            "vocab_size": cfg.vocab_size, "iteration": iteration, "model": cfg.to_dict()}


def hf_config(cfg: PathMoEConfig, *, vocab_rows: int, eod_id: int, dtype: torch.dtype,
              iteration: int | None, bos_id: int | None = None,
              tokenizer: dict | None = None) -> dict:
    """``config.json`` of the exported model. ``vocab_rows`` keeps megatron's padded
    vocabulary, so the logits (and their softmax) equal megatron's over every row. The
    end-of-document id is eos and pad, and bos unless the tokenizer has its own (Llama2)."""
    groups = cfg.num_query_groups or cfg.num_attention_heads
    architecture, model_type = hf_architecture(cfg)
    config = {
        "architectures": [architecture], "model_type": model_type,
        "vocab_size": vocab_rows, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.moe_ffn_hidden_size,  # dense MLP size; no layer is dense
        "moe_intermediate_size": cfg.moe_ffn_hidden_size,
        "shared_expert_intermediate_size": cfg.moe_shared_expert_intermediate_size or 0,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": groups, "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_length, "rms_norm_eps": cfg.norm_epsilon,
        "rope_theta": float(cfg.rotary_base),  # read by transformers < 5 and vLLM
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rotary_base)},
        "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.num_layers,
        "attention_dropout": 0.0, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.moe_router_topk,
        "norm_topk_prob": cfg.renormalises_topk,
        "output_router_logits": False, "router_aux_loss_coef": cfg.moe_aux_loss_coeff,
        "qkv_bias": cfg.add_qkv_bias, "initializer_range": cfg.init_method_std, "use_cache": True,
        "bos_token_id": eod_id if bos_id is None else bos_id, "eos_token_id": eod_id,
        "pad_token_id": eod_id,
        "dtype": str(dtype).removeprefix("torch."),
        METADATA_KEY: pathmoe_metadata(cfg, iteration, tokenizer),
    }
    if model_type == QWEN3_MODEL_TYPE:
        for name in _QWEN2_ONLY:
            del config[name]
        config.update(attention_bias=False,
                      head_dim=cfg.hidden_size // cfg.num_attention_heads)
    return config


def hf_only_tensors(cfg: PathMoEConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Qwen2-MoE tensors the model does not have, set so they change nothing: without a shared
    expert, a zero-size one and its gate (whose output multiplies the zero output)."""
    tensors: dict[str, torch.Tensor] = {}
    if cfg.moe_shared_expert_intermediate_size is not None or cfg.qk_layernorm:
        return tensors  # its own shared expert, or Qwen3-MoE (which has none)
    for layer in range(cfg.num_layers):
        prefix = f"model.layers.{layer}.mlp.shared_expert"
        tensors[f"{prefix}.gate_proj.weight"] = torch.zeros(0, cfg.hidden_size, dtype=dtype)
        tensors[f"{prefix}.up_proj.weight"] = torch.zeros(0, cfg.hidden_size, dtype=dtype)
        tensors[f"{prefix}.down_proj.weight"] = torch.zeros(cfg.hidden_size, 0, dtype=dtype)
        tensors[f"{prefix}_gate.weight"] = torch.zeros(1, cfg.hidden_size, dtype=dtype)
    return tensors


def pop_hf_only_tensors(hf_state: dict[str, torch.Tensor], cfg: PathMoEConfig) -> None:
    """Remove Qwen2-MoE tensors the PathMoE model has no counterpart for, after checking they
    contribute exactly nothing (zero q/k/v biases; without a shared expert in ``cfg``, a
    shared expert with zero output)."""
    for layer in range(cfg.num_layers):
        prefix = f"model.layers.{layer}."
        for name in () if cfg.add_qkv_bias else ("q", "k", "v"):  # else mapped
            bias = hf_state.pop(f"{prefix}self_attn.{name}_proj.bias", None)
            if bias is not None and bias.count_nonzero():
                raise ConversionError(f"{prefix}self_attn.{name}_proj.bias is not zero but "
                                      "config.json says qkv_bias false; set it true to import "
                                      "the biases (--add-qkv-bias)")
        if cfg.moe_shared_expert_intermediate_size is not None:
            continue  # mapped (mapping.QWEN2_MOE_TABLE)
        shared = [hf_state.pop(f"{prefix}mlp.shared_expert.{p}_proj.weight", None)
                  for p in ("gate", "up", "down")]
        hf_state.pop(f"{prefix}mlp.shared_expert_gate.weight", None)
        present = [t for t in shared if t is not None]
        if present and not any(t.numel() == 0 or not t.count_nonzero() for t in present):
            raise ConversionError(f"{prefix}mlp.shared_expert has non-zero weights; PathMoE has "
                                  "no shared expert, so this model cannot be imported exactly")


def _require(condition: bool, source: str, message: str) -> None:
    if not condition:
        raise ConversionError(f"{source}: {message}")


def check_supported(hf_cfg: Mapping[str, Any], source: str) -> None:
    """Refuse Qwen2-MoE options PathMoE cannot express, naming the config field."""
    model_type = hf_cfg.get("model_type")
    _require(model_type in (MODEL_TYPE, QWEN3_MODEL_TYPE), source,
             f"model_type is {model_type!r}; only {MODEL_TYPE!r} and {QWEN3_MODEL_TYPE!r} "
             "models (as written by `pathmoe-convert to-hf`) can be imported")
    _require(model_type != QWEN3_MODEL_TYPE or not hf_cfg.get("attention_bias", False), source,
             "attention_bias true biases o_proj, which PathMoE attention does not have")
    _require(hf_cfg.get("hidden_act", "silu") == "silu", source, "hidden_act must be 'silu'")
    _require(not hf_cfg.get("use_sliding_window", False), source,
             "use_sliding_window must be false (PathMoE attention is global)")
    _require(hf_cfg.get("decoder_sparse_step", 1) == 1 and not hf_cfg.get("mlp_only_layers"),
             source, "every layer must be a MoE layer (decoder_sparse_step 1, no mlp_only_layers)")
    rope = hf_cfg.get("rope_parameters") or hf_cfg.get("rope_scaling") or {}
    _require(rope.get("rope_type", rope.get("type", "default")) == "default", source,
             f"RoPE scaling {rope!r} is not supported (PathMoE uses plain RoPE)")
    heads, hidden = hf_cfg["num_attention_heads"], hf_cfg["hidden_size"]
    _require(hf_cfg.get("head_dim") in (None, hidden // heads), source,
             f"head_dim {hf_cfg.get('head_dim')} != hidden_size / num_attention_heads")


def _rope_theta(hf_cfg: Mapping[str, Any], source: str) -> int:
    theta = (hf_cfg.get("rope_parameters") or {}).get("rope_theta", hf_cfg.get("rope_theta",
                                                                                  10000.0))
    _require(float(theta).is_integer(), source, f"rope_theta {theta} is not an integer "
             "(PathMoEConfig.rotary_base is)")
    return int(theta)


def _config_from_fields(hf_cfg: Mapping[str, Any], source: str) -> PathMoEConfig:
    """A PathMoEConfig from the standard Qwen2-/Qwen3-MoE fields (a model without PathMoE
    metadata)."""
    qwen2 = hf_cfg.get("model_type") == MODEL_TYPE
    return PathMoEConfig(
        num_layers=hf_cfg["num_hidden_layers"], hidden_size=hf_cfg["hidden_size"],
        num_attention_heads=hf_cfg["num_attention_heads"],
        num_query_groups=hf_cfg.get("num_key_value_heads") or hf_cfg["num_attention_heads"],
        moe_ffn_hidden_size=hf_cfg["moe_intermediate_size"],
        seq_length=hf_cfg.get("max_position_embeddings", 4096),
        vocab_size=hf_cfg["vocab_size"], rotary_base=_rope_theta(hf_cfg, source),
        norm_epsilon=hf_cfg.get("rms_norm_eps", 1e-6),
        init_method_std=hf_cfg.get("initializer_range", 0.02),
        untie_embeddings_and_output_weights=not hf_cfg.get("tie_word_embeddings", False),
        num_experts=hf_cfg["num_experts"], moe_router_topk=hf_cfg["num_experts_per_tok"],
        moe_router_pre_softmax=not hf_cfg.get("norm_topk_prob", False),
        # transformers' Qwen2-MoE default (older configs lack the field): biased q/k/v.
        add_qkv_bias=qwen2 and bool(hf_cfg.get("qkv_bias", True)),
        qk_layernorm=not qwen2,
        # Qwen2-MoE gates its shared expert whenever it has one; Qwen3-MoE has none.
        moe_shared_expert_intermediate_size=(hf_cfg.get("shared_expert_intermediate_size")
                                             if qwen2 else None) or None,
        moe_shared_expert_gate=qwen2 and bool(hf_cfg.get("shared_expert_intermediate_size")),
        routing="independent",
        bf16=hf_cfg.get("dtype", hf_cfg.get("torch_dtype")) == "bfloat16")


def _config_from_metadata(meta: Mapping[str, Any], source: str) -> PathMoEConfig:
    _require(meta.get("format_version") == METADATA_VERSION, source,
             f"{METADATA_KEY}.format_version {meta.get('format_version')!r} is not "
             f"{METADATA_VERSION}; convert it with a matching megatron-pathmoe version")
    known = {f.name for f in dataclasses.fields(PathMoEConfig)}
    unknown = sorted(set(meta["model"]) - known)
    _require(not unknown, source, f"{METADATA_KEY}.model fields {unknown} are unknown to this "
             "version of megatron-pathmoe; upgrade it")
    return PathMoEConfig(**meta["model"])


def _check_metadata_matches(cfg: PathMoEConfig, hf_cfg: Mapping[str, Any], source: str) -> None:
    """The standard fields win for inference engines; refuse a metadata block that disagrees."""
    fields = _config_from_fields(hf_cfg, source)
    names = ("num_layers", "hidden_size", "num_attention_heads", "moe_ffn_hidden_size",
             "rotary_base", "norm_epsilon", "untie_embeddings_and_output_weights",
             "num_experts", "moe_router_topk", "renormalises_topk",
             "moe_shared_expert_intermediate_size", "moe_shared_expert_gate", "add_qkv_bias",
             "qk_layernorm")
    differing = [f"{n}: {getattr(cfg, n)!r} vs {getattr(fields, n)!r}" for n in names
                 if getattr(cfg, n) != getattr(fields, n)]
    if (cfg.num_query_groups or cfg.num_attention_heads) != fields.num_query_groups:
        differing.append("num_query_groups")
    _require(not differing, source, f"the {METADATA_KEY} block disagrees with the Qwen2-MoE "
             f"fields ({'; '.join(differing)}); was config.json edited by hand?")


def pathmoe_config(hf_cfg: Mapping[str, Any], source: str, *, routing: str | None = None,
                   path_block_size: int | None = None) -> PathMoEConfig:
    """The PathMoEConfig (world-1 layout) of a Qwen2-MoE ``config.json``.

    ``routing``/``path_block_size`` override what the metadata records (``independent`` is always
    exact: every layer keeps its own gate). Variants other than independent and path have no
    exact import: their exported gates are plain per-layer gates.
    """
    check_supported(hf_cfg, source)
    meta = hf_cfg.get(METADATA_KEY)
    cfg = _config_from_metadata(meta, source) if meta else _config_from_fields(hf_cfg, source)
    if meta:
        _check_metadata_matches(cfg, hf_cfg, source)
    chosen = routing or cfg.routing
    if chosen not in IMPORTABLE_ROUTING:
        raise ConversionError(
            f"{source}: the model was exported from routing variant {chosen!r}, whose router "
            "Megatron cannot rebuild from plain per-layer gates; import it with "
            "--routing independent (exact for inference: every layer keeps its exported gate)")
    block = path_block_size or (tied_block_size(cfg) if cfg.routing == "path" else None)
    if chosen == "path" and block is None:
        raise ConversionError(f"{source}: --routing path needs --path-block-size (the model "
                              "records no routing blocks)")
    cfg = cfg.replace(routing=chosen, path_block_size=block if chosen == "path" else None,
                      **_WORLD1_LAYOUT)
    try:
        return cfg.validate()
    except ValueError as err:
        raise ConversionError(f"{source}: {err}") from None
