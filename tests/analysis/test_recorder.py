"""The recorder and the permutation hooks on a real megatron GPTModel (one process)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_pathmoe.analysis.forward import TokenWindows, evaluate_loss, microbatch_plan
from megatron_pathmoe.analysis.path_arrays import PathWriter, load_paths
from megatron_pathmoe.analysis.recorder import PathRecorder, Slot, positions_of, routers_of
from megatron_pathmoe.analysis.robustness import ExpertPermutation, robustness_sweep
from megatron_pathmoe.config import PathMoEConfig

TINY = dict(num_layers=4, hidden_size=32, num_attention_heads=4, moe_ffn_hidden_size=48,
            seq_length=16, vocab_size=128, num_experts=4, moe_router_topk=2, routing="path",
            path_block_size=2)
MICRO_BATCH = 2


def build(seed: int = 0) -> torch.nn.Module:
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_pathmoe.model import build_gpt_model

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    model = build_gpt_model(PathMoEConfig(**TINY).validate())
    return model.eval()


def windows(samples: int = 5, seed: int = 0) -> TokenWindows:
    rng = np.random.default_rng(seed)
    stream = rng.integers(0, TINY["vocab_size"], samples * TINY["seq_length"] + 1)
    return TokenWindows.from_stream(stream, TINY["seq_length"], "test")


def plan_of(w: TokenWindows) -> list:
    return microbatch_plan(w.num_samples, w.seq_length, MICRO_BATCH, 1, 0)


def test_plan_deals_micro_batches_round_robin_with_padding():
    # 5 sequences of 16 tokens in micro-batches of 2 -> 3 micro-batches over 2 ranks.
    assert microbatch_plan(5, 16, 2, 2, 0) == [Slot(0, 2), Slot(64, 1)]
    assert microbatch_plan(5, 16, 2, 2, 1) == [Slot(32, 2), None]


def test_recorder_writes_each_tokens_routing_at_its_place(megatron_world1, tmp_path):
    model, w = build(), windows()
    plan = plan_of(w)
    writer = PathWriter.create(str(tmp_path), w.num_tokens, [1, 2, 3, 4], 4, 2)
    writer.write_tokens(0, w.inputs(), positions_of(w.num_samples, w.seq_length))
    with PathRecorder([model], writer, 2) as recorder:
        recorder.expect(plan)
        evaluate_loss([model], w, plan, MICRO_BATCH)
        recorder.check_complete()
    writer.finalize({})
    paths = load_paths(str(tmp_path))
    assert paths.tokens.tolist() == w.inputs().tolist()

    # Reference: each sequence alone (batch of one), the routers' raw outputs.
    seen = {}
    handles = [r.register_forward_hook(lambda r, i, o: seen.__setitem__(r.layer_number, o))
               for r in routers_of([model])]
    S = w.seq_length
    with torch.no_grad():
        for sample in range(w.num_samples):
            tokens = torch.from_numpy(w.stream[sample * S:(sample + 1) * S])[None]
            model(tokens, torch.arange(S)[None], None)
            for layer, (probs, routing_map) in seen.items():
                got = paths.experts[layer - 1, :, sample * S:(sample + 1) * S]  # [k, S]
                got_probs = paths.probs[layer - 1, :, sample * S:(sample + 1) * S]
                chosen = routing_map.nonzero()[:, 1].view(S, 2).sort(1).values.numpy()
                assert (np.sort(got.T, 1) == chosen).all(), f"layer {layer} sample {sample}"
                expected = probs.gather(1, torch.from_numpy(got.T.astype(np.int64))).numpy()
                np.testing.assert_allclose(got_probs.T, expected, rtol=1e-3, atol=1e-4)
                assert (got_probs[0] >= got_probs[1]).all()  # rank 0 = highest probability
    for handle in handles:
        handle.remove()


def test_recorder_refuses_unannounced_forwards(megatron_world1, tmp_path):
    model, w = build(), windows()
    plan = plan_of(w)
    with PathRecorder([model], None, 2) as recorder:
        recorder.expect(plan[:1])
        with pytest.raises(RuntimeError, match="micro-batches were announced"):
            evaluate_loss([model], w, plan, MICRO_BATCH)


def test_permutation_at_p0_equals_unpermuted_perplexity(megatron_world1):
    model, w = build(), windows()
    plan = plan_of(w)
    plain = evaluate_loss([model], w, plan, MICRO_BATCH)
    for seed in range(3):
        with ExpertPermutation([model], 0.0, seed) as permutation:
            assert permutation.permutations == {}
            assert evaluate_loss([model], w, plan, MICRO_BATCH) == plain
    sweep = robustness_sweep(lambda: evaluate_loss([model], w, plan, MICRO_BATCH), [model],
                             [0.0, 1.0], seeds=2)
    assert sweep["base_perplexity"] == math.exp(plain)
    assert sweep["sweep"][0] == {"p": 0.0, "perplexity": math.exp(plain), "perplexity_std": 0.0,
                                 "seeds": 1, "draw_perplexities": [math.exp(plain)],
                                 "degradation_percent": 0.0}
    assert sweep["sweep"][1]["seeds"] == 2
    draws = sweep["sweep"][1]["draw_perplexities"]
    assert len(draws) == 2 and sweep["sweep"][1]["perplexity"] == pytest.approx(sum(draws) / 2)
    assert sweep["sweep"][1]["perplexity"] != math.exp(plain)  # p=1 changes the model


def test_permutation_moves_each_choice_to_the_permuted_expert(megatron_world1):
    model, w = build(), windows(samples=1)
    before, after = {}, {}
    first = [r.register_forward_hook(lambda r, i, o: before.__setitem__(r.layer_number, o))
             for r in routers_of([model])]
    with ExpertPermutation([model], 1.0, seed=7) as permutation:
        second = [r.register_forward_hook(lambda r, i, o: after.__setitem__(r.layer_number, o))
                  for r in routers_of([model])]
        evaluate_loss([model], w, plan_of(w), MICRO_BATCH)
    for handle in first + second:
        handle.remove()
    assert sorted(permutation.permutations) == [1, 2, 3, 4]
    for layer, perm in permutation.permutations.items():
        for old, new in zip(before[layer], after[layer]):
            assert torch.equal(new[:, torch.from_numpy(perm)], old)  # new[:, perm[i]] = old[:, i]


def test_permuting_identical_experts_changes_nothing(megatron_world1):
    model, w = build(seed=1), windows()
    plan = plan_of(w)
    with torch.no_grad():
        for layer in model.decoder.layers:
            experts = layer.mlp.experts.local_experts
            for expert in experts[1:]:
                expert.load_state_dict(experts[0].state_dict())
    plain = evaluate_loss([model], w, plan, MICRO_BATCH)
    with ExpertPermutation([model], 1.0, seed=3):
        permuted = evaluate_loss([model], w, plan, MICRO_BATCH)
    assert permuted == pytest.approx(plain, rel=1e-6)
