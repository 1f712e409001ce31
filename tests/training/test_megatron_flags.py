"""Megatron-LM's architecture flags: accepted with Megatron-LM's meaning (the built model has
the shape they describe), values the model cannot honour and unimplemented Megatron-LM flags
fail with one line naming the flag."""

from __future__ import annotations

import pytest

from megatron_pathmoe.config import PathMoEConfig
from megatron_pathmoe.training.arguments import parse_args
from megatron_pathmoe.training.megatron_compat import UNSUPPORTED

BASE = ["--dry-run", "--dry-run-vocab-size", "1000", "--num-layers", "4", "--hidden-size", "64",
        "--num-attention-heads", "8", "--num-experts", "4", "--seq-length", "32"]
# Megatron-LM's Mixtral example's model flags (shrunk): all accepted.
MIXTRAL_STYLE = ["--use-mcore-models", "--disable-bias-linear", "--max-position-embeddings",
                 "64", "--ffn-hidden-size", "96", "--init-method-std", "0.01",
                 "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--normalization",
                 "RMSNorm", "--position-embedding-type", "rope", "--swiglu",
                 "--untie-embeddings-and-output-weights", "--group-query-attention",
                 "--num-query-groups", "2", "--no-masked-softmax-fusion",
                 "--no-position-embedding", "--rotary-base", "1000000", "--norm-epsilon",
                 "1e-6", "--moe-layer-freq", "1", "--no-bias-swiglu-fusion",
                 "--no-bias-dropout-fusion", "--no-rope-fusion",
                 "--no-gradient-accumulation-fusion", "--moe-per-layer-logging",
                 "--accumulate-allreduce-grads-in-fp32", "--use-dist-ckpt",
                 "--no-create-attention-mask-in-dataloader", "--distributed-backend", "nccl"]


def _error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(BASE + argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    return err.strip()


def test_megatron_lm_model_flags_are_accepted_with_their_meaning():
    model, _ = parse_args(BASE + MIXTRAL_STYLE)
    assert model.moe_ffn_hidden_size == 96  # --ffn-hidden-size sets the experts' width
    assert model.num_query_groups == 2
    assert model.max_position_embeddings == 64
    assert model.rotary_base == 1000000 and model.norm_epsilon == 1e-6
    assert model.init_method_std == 0.01 and model.untie_embeddings_and_output_weights


def test_derived_defaults_follow_megatron_lm():
    model, _ = parse_args(BASE + ["--ffn-hidden-size", "96", "--moe-ffn-hidden-size", "48"])
    assert model.moe_ffn_hidden_size == 48  # no dense layer uses --ffn-hidden-size
    model, _ = parse_args(BASE)
    assert model.moe_ffn_hidden_size == PathMoEConfig.moe_ffn_hidden_size
    assert model.num_query_groups is None  # multi-head attention
    model, _ = parse_args(BASE + ["--group-query-attention"])
    assert model.num_query_groups == 1  # Megatron-LM's --num-query-groups default
    model, _ = parse_args(BASE + ["--moe-layer-freq", "([1]*2)*2"])
    assert model.num_layers == 4
    model, _ = parse_args(BASE + ["--sequence-parallel"])
    assert not model.sequence_parallel  # Megatron-LM turns it off at TP 1


@pytest.mark.parametrize("argv, expected", [
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"], 2),
    (["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2"], 2),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2"],
     None),
])
def test_virtual_pipeline_spellings(argv, expected):
    model, _ = parse_args(BASE + ["--dry-run-world-size", "2", "--global-batch-size", "8",
                                  "--micro-batch-size", "2"] + argv)
    assert model.virtual_pipeline_model_parallel_size == expected


@pytest.mark.parametrize("argv, flag, supported", [
    (["--normalization", "LayerNorm"], "--normalization LayerNorm", "RMSNorm"),
    (["--position-embedding-type", "learned_absolute"],
     "--position-embedding-type learned_absolute", "rope and none"),
    (["--moe-layer-freq", "[1]*3+[0]"], "--moe-layer-freq [1]*3+[0]", "use 1"),
    (["--moe-layer-freq", "2"], "--moe-layer-freq 2", "use 1"),
    (["--moe-layer-freq", "[1]*3"], "--moe-layer-freq [1]*3", "every one of the 4 layers"),
    (["--max-position-embeddings", "16"], "--max-position-embeddings 16", "--seq-length 32"),
    (["--rotary-percent", "0.4"], "--rotary-percent 0.4 rotates 3 of 8", "even"),
    (["--kv-channels", "0"], "--kv-channels", "positive"),
    (["--num-layers-per-virtual-pipeline-stage", "3"],
     "--num-layers-per-virtual-pipeline-stage 3", "must divide"),
])
def test_values_the_model_cannot_honour_fail_in_one_line(capsys, argv, flag, supported):
    err = _error(capsys, argv)
    assert err.startswith("pathmoe-pretrain: error: ") and flag in err and supported in err


@pytest.mark.parametrize("flag", sorted(UNSUPPORTED))
def test_unsupported_megatron_lm_flags_are_named(capsys, flag):
    err = _error(capsys, [flag, "2"] if flag != "--fp16" else [flag])
    assert err == (f"pathmoe-pretrain: {flag} (Megatron-LM) is not supported by "
                   f"megatron-pathmoe: {UNSUPPORTED[flag].why}")


@pytest.mark.parametrize("flag, value", [(f, e.accepts) for f, e in UNSUPPORTED.items()
                                         if e.accepts is not None])
def test_the_off_value_of_an_unsupported_flag_is_accepted(flag, value):
    parse_args(BASE + [flag, value])


def test_a_flag_in_no_list_gets_argparses_error(capsys):
    err = _error(capsys, ["--no-such-megatron-flag", "1"])
    assert "unrecognized arguments: --no-such-megatron-flag" in err


def _param_shapes(cfg: PathMoEConfig) -> dict[str, tuple[int, ...]]:
    from megatron_pathmoe.model import build_gpt_model, count_parameters
    from megatron_pathmoe.model.estimate import count_model_parameters

    model = build_gpt_model(cfg)
    assert count_model_parameters(cfg) == count_parameters(model, cfg)  # the estimate follows
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def test_shape_flags_reach_the_built_model(megatron_world1):
    """--kv-channels, --num-query-groups, --make-vocab-size-divisible-by, --ffn-hidden-size,
    --disable-bias-linear, untied embeddings: the parameter shapes they describe."""
    model, _ = parse_args(BASE + ["--kv-channels", "16", "--group-query-attention",
                                  "--num-query-groups", "2", "--make-vocab-size-divisible-by",
                                  "64", "--ffn-hidden-size", "40", "--disable-bias-linear"])
    shapes = _param_shapes(model)
    layer = "decoder.layers.0."
    # QKV: 8 query heads + 2 x 2 KV groups, each 16 wide; output projection back to hidden.
    assert shapes[layer + "self_attention.linear_qkv.weight"] == ((8 + 2 * 2) * 16, 64)
    assert shapes[layer + "self_attention.linear_proj.weight"] == (64, 8 * 16)
    assert shapes["embedding.word_embeddings.weight"] == (1024, 64)  # 1000 padded to 64s
    assert shapes["output_layer.weight"] == (1024, 64)  # untied by default
    assert shapes[layer + "mlp.experts.local_experts.0.linear_fc1.weight"] == (2 * 40, 64)
    assert not [name for name in shapes if name.endswith(".bias")]


def test_tied_embeddings_and_no_position_embedding(megatron_world1):
    model, _ = parse_args(BASE + ["--no-untie-embeddings-and-output-weights",
                                  "--position-embedding-type", "none"])
    built = _build(model)
    assert "output_layer.weight" not in dict(built.named_parameters())
    assert built.position_embedding_type == "none" and not hasattr(built, "rotary_pos_emb")


def test_rotary_percent_rotates_that_fraction(megatron_world1):
    model, _ = parse_args(BASE + ["--rotary-percent", "0.5", "--rotary-base", "500"])
    rope = _build(model).rotary_pos_emb
    head = 64 // 8
    assert rope.inv_freq.numel() == head // 2 // 2  # half of the head's channel pairs
    assert float(rope.inv_freq[1]) == pytest.approx(1 / 500 ** (2 / (head // 2)))


def _build(cfg: PathMoEConfig):
    from megatron_pathmoe.model import build_gpt_model

    return build_gpt_model(cfg)


@pytest.mark.parametrize("argv, flag", [(["--kv-channels", "16"], "--kv-channels 16"),
                                        (["--rotary-percent", "0.5"], "--rotary-percent 0.5"),
                                        (["--position-embedding-type", "none"],
                                         "--position-embedding-type none"),
                                        (["--qk-layernorm", "--add-qkv-bias"],
                                         "--qk-layernorm with --add-qkv-bias")])
def test_hugging_face_export_refuses_shapes_qwen2_moe_lacks(argv, flag):
    from megatron_pathmoe.convert.errors import ConversionError
    from megatron_pathmoe.convert.qwen2_moe import check_exportable

    check_exportable(parse_args(BASE)[0])
    with pytest.raises(ConversionError, match=flag):
        check_exportable(parse_args(BASE + argv)[0])


def test_readme_lists_every_unsupported_flag():
    import os

    from tests.conftest import REPO

    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme[readme.index("## Coming from Megatron-LM"):]
    assert [flag for flag in UNSUPPORTED if f"`{flag}" not in section] == []


def test_an_abbreviated_flag_is_an_error_as_in_megatron_lm(capsys):
    err = _error(capsys, ["--train-iter", "5"])  # --train-iters, misspelt
    assert "unrecognized arguments: --train-iter" in err
