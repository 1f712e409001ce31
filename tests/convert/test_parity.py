"""Megatron forward == Hugging Face forward of the export (fp32, CPU), and exact round trips."""

from __future__ import annotations

import pytest
import torch

from megatron_pathmoe.convert import (
    canonical_state,
    export_to_hf,
    hf_to_megatron,
    import_from_hf,
    megatron_to_hf,
    tie_block_routers,
)
from megatron_pathmoe.convert.hf_files import read_weights
from tests.convert.conftest import (
    TOKENIZER,
    build_model,
    export_model,
    load_hf,
    megatron_logits,
    random_tokens,
    tiny_config,
)

LOGITS_ATOL = 1e-4

CASES = {
    "independent-gqa-presoftmax": dict(routing="independent"),
    "path-gqa-presoftmax": dict(routing="path", path_block_size=2),
    "path-mha-renormalised": dict(routing="path", path_block_size=4, num_query_groups=None,
                                  moe_router_pre_softmax=False),
    "independent-mha-renormalised-tied": dict(routing="independent", num_query_groups=None,
                                              moe_router_pre_softmax=False,
                                              untie_embeddings_and_output_weights=False),
    # Sinkhorn balancing only picks the experts while training: inference is the masked
    # softmax over all experts (norm_topk_prob false), whatever --moe-router-pre-softmax says.
    # Qwen-style: q/k/v biases and a gated shared expert (mlp.shared_expert, _gate).
    "path-qkv-bias-shared-expert": dict(routing="path", path_block_size=2, add_qkv_bias=True,
                                        moe_shared_expert_intermediate_size=48,
                                        moe_shared_expert_gate=True),
    # Per-head query/key norms: Qwen3-MoE (self_attn.q_norm / k_norm).
    "path-qk-layernorm-qwen3": dict(routing="path", path_block_size=2, qk_layernorm=True,
                                    moe_router_pre_softmax=False),
    "path-sinkhorn": dict(routing="path", path_block_size=2, moe_router_pre_softmax=False,
                          moe_router_load_balancing_type="sinkhorn"),
}


def _model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


@pytest.mark.parametrize("case", list(CASES))
def test_hf_logits_match_megatron(megatron_world1, tmp_path, case):
    cfg = tiny_config(**CASES[case])
    model = build_model(cfg, seed=len(case))
    tokens = random_tokens(cfg)
    hf = load_hf(export_model(model, cfg, str(tmp_path / "hf")))
    assert type(hf).__name__ == ("Qwen3MoeForCausalLM" if cfg.qk_layernorm
                                 else "Qwen2MoeForCausalLM")
    with torch.no_grad():
        hf_logits = hf(tokens).logits
    reference = megatron_logits(model, tokens)
    diff = (hf_logits - reference).abs().max().item()
    print(f"{case}: max |logits diff| = {diff:.3g}")
    assert hf_logits.shape == reference.shape
    assert diff < LOGITS_ATOL


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_round_trip_is_bitwise(megatron_world1, case):
    cfg = tiny_config(**CASES[case])
    model = build_model(cfg, seed=3)
    back = hf_to_megatron(megatron_to_hf(canonical_state(model, cfg), cfg), cfg)
    if cfg.routing == "path":
        back = tie_block_routers(back, cfg)
    original = _model_tensors(model)
    assert back.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key


def test_checkpoint_round_trip_through_files(megatron_world1, tmp_path):
    """megatron checkpoint -> HF directory (2 shards) -> megatron checkpoint: bitwise equal
    weights, block ties restored, and the same logits."""
    from megatron_pathmoe.checkpoint import (
        load_model_for_inference,
        read_run_config,
        save_model_checkpoint,
    )

    cfg = tiny_config()
    model = build_model(cfg, seed=5)
    save_model_checkpoint(model, cfg, str(tmp_path / "mg"), 7, TOKENIZER)
    hf_dir = export_to_hf(str(tmp_path / "mg"), str(tmp_path / "hf"), max_shard_size="300KB")
    assert len(read_weights(hf_dir)) > 0
    iter_dir = import_from_hf(hf_dir, str(tmp_path / "mg2"))
    assert iter_dir.endswith("iter_0000007")
    assert read_run_config(iter_dir).model.routing == "path"
    reloaded, _ = load_model_for_inference(str(tmp_path / "mg2"))
    original, restored = _model_tensors(model), _model_tensors(reloaded)
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    routers = [layer.mlp.router for layer in reloaded.decoder.layers]
    assert routers[1].weight is routers[0].weight and routers[3].weight is routers[2].weight
    tokens = random_tokens(cfg)
    assert torch.equal(megatron_logits(model, tokens), megatron_logits(reloaded, tokens))


def test_bfloat16_export(megatron_world1, tmp_path):
    """--dtype bfloat16: every tensor and config.json say bfloat16; transformers loads it."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config()
    model = build_model(cfg)
    hf_dir = export_model(model, cfg, str(tmp_path / "hf"), dtype=torch.bfloat16)
    assert {t.dtype for t in read_weights(hf_dir).values()} == {torch.bfloat16}
    hf = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert hf.config.dtype == torch.bfloat16 and hf.model.embed_tokens.weight.dtype == torch.bfloat16
