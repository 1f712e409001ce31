"""Routing variants (exact export or a clear refusal) and bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_pathmoe.convert import ConversionError, canonical_state, import_from_hf
from megatron_pathmoe.convert.checkpoint import export_to_hf
from megatron_pathmoe.checkpoint import CheckpointError, load_model_for_inference
from tests.conftest import run_cli
from tests.convert.conftest import (
    build_model,
    export_model,
    load_hf,
    megatron_logits,
    random_tokens,
    tiny_config,
)


@pytest.mark.parametrize("routing", ["lowrank", "random"])
def test_linear_gate_variants_export_exactly_and_import_as_independent(megatron_world1, tmp_path,
                                                                       routing):
    cfg = tiny_config(routing=routing)
    model = build_model(cfg, seed=11)
    hf_dir = export_model(model, cfg, str(tmp_path / "hf"))
    tokens = random_tokens(cfg)
    with torch.no_grad():
        diff = (load_hf(hf_dir)(tokens).logits - megatron_logits(model, tokens)).abs().max()
    assert diff < 1e-4
    with pytest.raises(ConversionError, match=f"routing variant '{routing}'.*--routing independent"):
        import_from_hf(hf_dir, str(tmp_path / "refused"))
    import_from_hf(hf_dir, str(tmp_path / "mg"), routing="independent")
    imported, run = load_model_for_inference(str(tmp_path / "mg"))
    assert run.model.routing == "independent"
    assert (megatron_logits(imported, tokens) - megatron_logits(model, tokens)).abs().max() < 1e-4


@pytest.mark.parametrize("routing, why", [("xmoe", "cosine similarities"),
                                          ("mono", "reuse the first layer's decisions")])
def test_nonlinear_routers_are_refused_naming_the_variant(megatron_world1, routing, why):
    cfg = tiny_config(routing=routing, path_block_size=2)
    with pytest.raises(ConversionError, match=f"--routing {routing}.*{why}"):
        canonical_state(build_model(cfg), cfg)


def test_sigmoid_scores_are_refused(megatron_world1, tmp_path):
    cfg = tiny_config(moe_router_score_function="sigmoid")
    with pytest.raises(ConversionError, match="sigmoid"):
        export_model(build_model(cfg), cfg, str(tmp_path / "hf"))


def test_sinkhorn_model_round_trips_and_top1_is_refused(megatron_world1, tmp_path):
    cfg = tiny_config(moe_router_load_balancing_type="sinkhorn", moe_router_pre_softmax=False)
    model = build_model(cfg, seed=5)
    hf_dir = export_model(model, cfg, str(tmp_path / "hf"))
    with open(os.path.join(hf_dir, "config.json")) as f:
        assert json.load(f)["norm_topk_prob"] is False
    import_from_hf(hf_dir, str(tmp_path / "mg"))
    imported, run = load_model_for_inference(str(tmp_path / "mg"))
    assert run.model.moe_router_load_balancing_type == "sinkhorn"
    tokens = random_tokens(cfg)
    assert (megatron_logits(imported, tokens) - megatron_logits(model, tokens)).abs().max() < 1e-4
    top1 = tiny_config(moe_router_load_balancing_type="sinkhorn", moe_router_topk=1,
                       moe_router_pre_softmax=False)
    with pytest.raises(ConversionError, match="sinkhorn.*sigmoid"):
        export_model(build_model(top1), top1, str(tmp_path / "top1"))


def test_qwen_style_model_round_trips_and_the_shared_expert_needs_its_gate(megatron_world1, tmp_path):
    """A Qwen-style model (gated shared expert, q/k/v biases) exports to Qwen2-MoE, imports
    back from the standard fields alone (no PathMoE metadata, no qkv_bias field: transformers'
    default, biased) with the same logits; without the gate (no Qwen2-MoE equivalent) the
    export is refused."""
    cfg = tiny_config(routing="independent", moe_shared_expert_intermediate_size=48,
                      moe_shared_expert_gate=True, add_qkv_bias=True)
    model = build_model(cfg, seed=7)
    hf_dir = export_model(model, cfg, str(tmp_path / "hf"))
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf_cfg = json.load(f)
    assert hf_cfg["shared_expert_intermediate_size"] == 48
    del hf_cfg["pathmoe"], hf_cfg["qkv_bias"]  # as an older Qwen2-MoE config would be
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f)
    import_from_hf(hf_dir, str(tmp_path / "mg"))
    imported, run = load_model_for_inference(str(tmp_path / "mg"))
    assert (run.model.moe_shared_expert_intermediate_size, run.model.moe_shared_expert_gate,
            run.model.add_qkv_bias) == (48, True, True)
    tokens = random_tokens(cfg)
    assert (megatron_logits(imported, tokens) - megatron_logits(model, tokens)).abs().max() < 1e-4
    ungated = tiny_config(moe_shared_expert_intermediate_size=48)
    with pytest.raises(ConversionError, match="--moe-shared-expert-gate"):
        export_model(build_model(ungated), ungated, str(tmp_path / "ungated"))


def test_qwen3_moe_imports_without_metadata(megatron_world1, tmp_path):
    """--qk-layernorm exports as Qwen3-MoE; its standard fields alone import it back (q/k
    norms, no shared expert, no biases) with the same logits; Qwen3-MoE cannot carry a
    shared expert, so that combination is refused."""
    cfg = tiny_config(routing="independent", qk_layernorm=True)
    model = build_model(cfg, seed=9)
    hf_dir = export_model(model, cfg, str(tmp_path / "hf"))
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf_cfg = json.load(f)
    assert (hf_cfg["model_type"], hf_cfg["attention_bias"]) == ("qwen3_moe", False)
    assert "shared_expert_intermediate_size" not in hf_cfg
    del hf_cfg["pathmoe"]
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f)
    import_from_hf(hf_dir, str(tmp_path / "mg"))
    imported, run = load_model_for_inference(str(tmp_path / "mg"))
    assert (run.model.qk_layernorm, run.model.add_qkv_bias,
            run.model.moe_shared_expert_intermediate_size) == (True, False, None)
    tokens = random_tokens(cfg)
    assert (megatron_logits(imported, tokens) - megatron_logits(model, tokens)).abs().max() < 1e-4
    shared = tiny_config(qk_layernorm=True, moe_shared_expert_intermediate_size=32,
                         moe_shared_expert_gate=True)
    with pytest.raises(ConversionError, match="Qwen3-MoE, which has no shared expert"):
        export_model(build_model(shared), shared, str(tmp_path / "shared"))


def test_edited_block_copy_is_refused(exported_tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, hf_dir = exported_tiny
    edited = tmp_path / "edited"
    edited.mkdir()
    for name in os.listdir(hf_dir):
        if name != "model.safetensors":
            (edited / name).write_bytes(open(os.path.join(hf_dir, name), "rb").read())
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    tensors["model.layers.3.mlp.gate.weight"][0, 0] += 1e-3
    save_file(tensors, str(edited / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"layers\.3\.mlp\.gate\.weight differs from "
                                              r"model\.layers\.2.*layers 2-3 share one router"):
        import_from_hf(str(edited), str(tmp_path / "mg"))
    config = json.load(open(edited / "config.json"))
    config["num_hidden_layers"] = 8
    json.dump(config, open(edited / "config.json", "w"))
    with pytest.raises(ConversionError, match="disagrees with the Qwen2-MoE fields"):
        import_from_hf(str(edited), str(tmp_path / "mg"))


def test_bad_paths_give_clear_errors(exported_tiny, tmp_path):
    _, _, hf_dir = exported_tiny
    with pytest.raises(CheckpointError, match="does not exist"):
        export_to_hf(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        export_to_hf(hf_dir, str(tmp_path / "out"))  # a Hugging Face directory, not megatron's
    with pytest.raises(ConversionError, match="is not a directory"):
        import_from_hf(str(tmp_path / "nowhere"), str(tmp_path / "mg"))
    with pytest.raises(ConversionError, match="no config.json"):
        import_from_hf(str(tmp_path), str(tmp_path / "mg"))
    with pytest.raises(ConversionError, match="--max-shard-size 'lots'"):
        from megatron_pathmoe.convert.hf_files import parse_size
        parse_size("lots")


def test_cli_reports_one_line_errors(tmp_path):
    missing = str(tmp_path / "no_checkpoint")
    result = run_cli(["tools/convert_checkpoint.py", "to-hf", "--load", missing,
                      "--output", str(tmp_path / "out")])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"pathmoe-convert: error: checkpoint {missing!r} does not exist")
    assert "Traceback" not in result.stderr


def test_cli_help_lists_both_directions(capsys):
    from megatron_pathmoe.convert.cli import build_parser

    for command, flag in (("to-hf", "--max-shard-size"), ("to-megatron", "--path-block-size")):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([command, "--help"])
        assert exit_info.value.code == 0 and flag in capsys.readouterr().out
