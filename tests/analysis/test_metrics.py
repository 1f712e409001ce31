"""Path metrics on small synthetic routing arrays whose answers are computed by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from megatron_pathmoe.analysis.alignment import align_layers, cramers_v, min_cost_assignment
from megatron_pathmoe.analysis.consistency import (
    consistency_by_window,
    engagement_runs,
    pair_jaccard,
    routing_correlation,
    usage_entropy_by_layer,
    window_weights,
)
from megatron_pathmoe.analysis.load import balance_statistics, expert_load
from megatron_pathmoe.analysis.paths import PathDistribution, path_keys, path_statistics


def _identity_frames(num_layers: int, num_experts: int) -> np.ndarray:
    return np.tile(np.arange(num_experts, dtype=np.uint8), (num_layers, 1))


def _random_sets(rng, num_tokens: int, num_experts: int, topk: int) -> np.ndarray:
    """[k, N] distinct experts per token, uniform."""
    return np.argsort(rng.random((num_tokens, num_experts)), axis=1)[:, :topk].T.astype(np.uint8)


# ----------------------------------------------------------------------------- entropy

def test_one_path_has_zero_entropy():
    top1 = np.full((6, 1000), 3, np.uint8)
    dist, _ = path_statistics(top1, 8)
    assert dist.unique_paths == 1 and dist.entropy_bits == 0.0
    assert dist.effective_path_space == 1.0 and dist.coverage([1])[0] == 1.0


def test_hand_computed_distribution():
    # Paths over 2 layers: (0,0) twice, (0,1) once, (1,0) once -> frequencies 1/2, 1/4, 1/4.
    top1 = np.array([[0, 0, 0, 1], [0, 0, 1, 0]], np.uint8)
    dist, keys = path_statistics(top1, 2)
    assert dist.exact and dist.unique_paths == 3
    assert dist.entropy_bits == pytest.approx(1.5)  # 1/2*1 + 2 * 1/4*2
    assert dist.effective_path_space == pytest.approx(2 ** 1.5)
    np.testing.assert_allclose(dist.coverage([0, 1, 2, 3, 10]), [0, 0.5, 0.75, 1.0, 1.0])
    assert dist.paths_to_cover(0.5) == 1 and dist.paths_to_cover(0.6) == 2
    top_keys, counts = dist.most_frequent(2)
    assert counts.tolist() == [2, 1]
    # Rank 0 is path (0,0); of the tied paths the smaller key ((0,1) = 1 < (1,0) = 2) ranks 1.
    assert dist.rank_of(keys, 2).tolist() == [0, 0, 1, -1]


def test_uniform_independent_routing_reaches_L_log2_E():
    rng = np.random.default_rng(0)
    L, E, N = 4, 4, 400_000  # 256 paths, ~1,600 tokens each: the plug-in bias is ~5e-4 bits
    dist, _ = path_statistics(rng.integers(0, E, (L, N), dtype=np.uint8), E)
    assert dist.unique_paths == E ** L
    assert dist.entropy_bits == pytest.approx(L * math.log2(E), abs=5e-3)


def test_saturated_long_paths_reach_log2_tokens_with_hashed_keys():
    # 24 layers x 16 experts = 96 bits: keys are hashed; with N << 2^96 every path is unique.
    rng = np.random.default_rng(1)
    N = 20_000
    dist, _ = path_statistics(rng.integers(0, 16, (24, N), dtype=np.uint8), 16)
    assert not dist.exact and dist.collision_bound < 1e-10
    assert dist.unique_paths == N
    assert dist.entropy_bits == pytest.approx(math.log2(N))


def test_hashed_keys_count_like_exact_tuples():
    rng = np.random.default_rng(2)
    # Correlated long paths: few distinct ones, many repeats.
    base = rng.integers(0, 16, (24, 50), dtype=np.uint8)
    top1 = base[:, rng.integers(0, 50, 5000)]
    top1[5, :100] = 7  # and some variants
    dist, _ = path_statistics(top1, 16)
    _, counts = np.unique(top1.T, axis=0, return_counts=True)
    assert dist.unique_paths == counts.size
    assert sorted(dist.counts.tolist()) == sorted(counts.tolist())


def test_exact_keys_are_base_E_digits():
    top1 = np.array([[1, 2], [0, 2], [3, 1]], np.uint8)  # paths 1-0-3 and 2-2-1
    keys, exact = path_keys(top1, 4)
    assert exact and keys.tolist() == [1 * 16 + 0 * 4 + 3, 2 * 16 + 2 * 4 + 1]


# ----------------------------------------------------------------------------- alignment

def test_min_cost_assignment_matches_brute_force():
    rng = np.random.default_rng(3)
    for n in range(1, 7):
        for _ in range(20):
            cost = rng.integers(0, 4, (n, n)).astype(float)  # many ties
            col = min_cost_assignment(cost)
            assert sorted(col.tolist()) == list(range(n))
            best = min(sum(cost[i, p[i]] for i in range(n))
                       for p in itertools.permutations(range(n)))
            assert cost[np.arange(n), col].sum() == best


def _same_decisions_relabelled(seed: int, L: int, E: int, k: int, N: int) -> np.ndarray:
    """Every layer makes the same top-k decision, each under its own expert labels."""
    rng = np.random.default_rng(seed)
    first = _random_sets(rng, N, E, k)
    return np.stack([rng.permutation(E).astype(np.uint8)[first] for _ in range(L)])


def test_identical_decisions_under_permuted_labels_align_perfectly():
    L, E, k, N = 6, 8, 3, 4000
    experts = _same_decisions_relabelled(4, L, E, k, N)
    alignment = align_layers(experts[:, 0], E)
    correlation = routing_correlation(alignment)
    assert correlation["agreement"] == [1.0] * (L - 1)
    assert correlation["cramers_v"] == pytest.approx([1.0] * (L - 1))
    jaccard = pair_jaccard(experts, alignment.frames)
    assert jaccard.tolist() == [1.0] * (L - 1)
    assert consistency_by_window(jaccard, range(2, 13)) == {w: 1.0 for w in range(2, L + 1)}
    # One run of L layers per token; usage entropy log2(k) at every layer.
    runs = engagement_runs(experts[:, 0], alignment.frames)
    assert runs[L] == N and runs.sum() == N
    np.testing.assert_allclose(usage_entropy_by_layer(experts, alignment.frames),
                               [math.log2(k)] * L, atol=1e-12)
    # The aligned experts are the first layer's, at every layer.
    aligned = alignment.align(experts)
    assert (aligned == aligned[0]).all()


def test_independent_uniform_routing_has_chance_agreement_and_jaccard():
    rng = np.random.default_rng(5)
    L, E, k, N = 3, 8, 2, 200_000
    experts = np.stack([_random_sets(rng, N, E, k) for _ in range(L)])
    alignment = align_layers(experts[:, 0], E)
    agreement = np.asarray(routing_correlation(alignment)["agreement"])
    assert (np.abs(agreement - 1 / E) < 0.01).all()  # a matching of noise: chance level
    # |A n B| for two uniform 2-subsets of 8: P(0) = 15/28, P(1) = 12/28, P(2) = 1/28,
    # Jaccard = i / (4 - i): E[J] = 12/28 * 1/3 + 1/28 * 1 = 5/28.
    np.testing.assert_allclose(pair_jaccard(experts, alignment.frames), 5 / 28, atol=0.01)


def test_cramers_v_of_independent_table_is_zero():
    assert cramers_v(np.full((4, 4), 25)) == pytest.approx(0.0)
    assert cramers_v(np.eye(3) * 10) == pytest.approx(1.0)
    assert cramers_v(np.array([[5, 0], [0, 0]])) is None


# ----------------------------------------------------------------------------- windows, runs

def test_window_weights_and_consistency_by_window():
    assert window_weights(4, 2).tolist() == [1, 1, 1]
    assert window_weights(4, 3).tolist() == [1, 2, 1]  # windows {1,2,3}, {2,3,4}
    assert window_weights(4, 4).tolist() == [1, 1, 1]
    # Pair Jaccards 1, 0, 1: w=2 -> mean 2/3; w=3 -> windows average 1/2 and 1/2; w=4 -> 2/3.
    assert consistency_by_window(np.array([1.0, 0.0, 1.0]), [2, 3, 4, 5]) == \
        pytest.approx({2: 2 / 3, 3: 0.5, 4: 2 / 3})


def test_engagement_runs_by_hand():
    top1 = np.array([[0, 0, 1, 1, 1],  # runs of 2 and 3
                     [2, 2, 2, 2, 2],  # one run of 5
                     [0, 1, 0, 1, 0]], np.uint8).T  # five runs of 1
    runs = engagement_runs(top1, _identity_frames(5, 4))
    assert runs.tolist() == [0, 5, 1, 1, 0, 1]


def test_usage_entropy_by_hand():
    # k=1, one token using experts 0, 0, 1, 1: counts (1), (2), (2,1), (2,2).
    experts = np.array([[0, 0, 1, 1]], np.uint8).T[:, None, :]  # [L=4, k=1, N=1]
    h3 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    np.testing.assert_allclose(usage_entropy_by_layer(experts, _identity_frames(4, 4)),
                               [0.0, 0.0, h3, 1.0], atol=1e-12)


def test_jaccard_of_hand_sets_with_many_experts():
    # E = 100 (several mask words): {3, 70} vs {70, 99} share 1 of 3; identical sets share all.
    experts = np.array([[[3, 5], [70, 6]], [[70, 5], [99, 6]]], np.uint8)  # [L=2, k=2, N=2]
    frames = _identity_frames(2, 100)
    np.testing.assert_allclose(pair_jaccard(experts, frames), [(1 / 3 + 1.0) / 2])
    small = np.array([[[3, 5], [7, 6]], [[7, 5], [1, 6]]], np.uint8)  # same with E = 8
    np.testing.assert_allclose(pair_jaccard(small, _identity_frames(2, 8)), [(1 / 3 + 1.0) / 2])


# ----------------------------------------------------------------------------- load

def test_expert_load_and_balance_by_hand():
    # One layer, k=2, 4 experts, 4 tokens: expert 0 picked 4 times, 1 twice, 2 twice, 3 never.
    experts = np.array([[[0, 0, 0, 0], [1, 1, 2, 2]]], np.uint8)
    load = expert_load(experts, 4)
    np.testing.assert_allclose(load, [[0.5, 0.25, 0.25, 0.0]])
    stats = balance_statistics(load)
    assert stats["per_layer"]["max_violation"] == [1.0]  # 0.5 * 4 - 1
    assert stats["per_layer"]["min_ratio"] == [0.0] and stats["unused_experts"] == 1
    assert stats["per_layer"]["normalized_entropy"] == pytest.approx([1.5 / 2])
    uniform = balance_statistics(np.full((2, 4), 0.25))
    assert uniform["mean_max_violation"] == 0.0 and uniform["mean_cv"] == 0.0
    assert uniform["mean_normalized_entropy"] == pytest.approx(1.0)


def test_empty_distribution_is_refused():
    with pytest.raises(ValueError, match="at least one token"):
        PathDistribution.from_keys(np.zeros(0, np.uint64), True)
