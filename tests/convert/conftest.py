"""Tiny PathMoE models and their Hugging Face exports for the conversion tests."""

from __future__ import annotations

import os

import pytest
import torch

from megatron_pathmoe.config import PathMoEConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(REPO, "data", "shakespeare", "tokenizer.json")
# vocab 4000 pads to 4096 rows (= the demo tokenizer's size): the padding rows are exported too.
TINY = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
            moe_ffn_hidden_size=32, seq_length=32, vocab_size=4000, num_experts=4,
            moe_router_topk=2, routing="path", path_block_size=2)


def tiny_config(**overrides) -> PathMoEConfig:
    fields = {**TINY, **overrides}
    if fields["routing"] != "path":
        fields["path_block_size"] = None
    return PathMoEConfig(**fields).validate()


def build_model(cfg: PathMoEConfig, seed: int = 0) -> torch.nn.Module:
    """A world-1 model whose every parameter (norms and routers included) is randomised, so a
    swapped or mis-sliced tensor changes the logits."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_pathmoe.model import build_gpt_model

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    model = build_gpt_model(cfg)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def random_tokens(cfg: PathMoEConfig, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, cfg.seq_length), generator=g)


@torch.no_grad()
def megatron_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
    return model(tokens, positions, None)


def export_model(model: torch.nn.Module, cfg: PathMoEConfig, out_dir: str, **kwargs) -> str:
    from megatron_pathmoe.convert.checkpoint import write_hf_directory
    from megatron_pathmoe.convert.shards import canonical_state

    os.makedirs(out_dir, exist_ok=True)
    write_hf_directory(canonical_state(model, cfg), cfg, out_dir, tokenizer=TOKENIZER,
                       **kwargs)
    return out_dir


def load_hf(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def exported_tiny(megatron_world1, tmp_path_factory):
    """(model, config, HF directory) of one exported path-routing model, shared by the
    generate / lm-eval / error tests."""
    cfg = tiny_config()
    model = build_model(cfg)
    return model, cfg, export_model(model, cfg, str(tmp_path_factory.mktemp("hf_tiny")))
