"""Path restriction: the paths file, path counting, the token-to-path mapping, the workflow."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megatron_pathmoe.analysis.record_paths import count_top1_paths, sorted_path_counts
from megatron_pathmoe.config import ConfigError, PathMoEConfig
from megatron_pathmoe.expert_paths import read_paths_file, write_paths_file
from tests.unit.test_block_shared_router import TINY, batch, build, routers
from tests.unit.test_routing_golden import EYE, make_routers, set_, tokens


def forward(model, data):
    tokens_, positions = data
    model(tokens_, positions, None)


def paths_of(model, num_layers: int = TINY["num_layers"]):
    return count_top1_paths(model, [batch()], num_layers, forward)


# --------------------------------------------------------------------------- file format

def test_paths_file_round_trip_and_checks(tmp_path):
    paths = np.array([[0, 1, 2], [3, 3, 0]])
    written = write_paths_file(str(tmp_path / "top"), paths, [7, 2], {"num_experts": 4})
    assert written == str(tmp_path / "top.npy")
    loaded = read_paths_file(written, num_layers=3, num_experts=4)
    np.testing.assert_array_equal(loaded.paths, paths)
    assert loaded.counts == [7, 2] and loaded.meta["num_experts"] == 4
    with pytest.raises(ValueError, match="over 3 layers but the model has --num-layers 4"):
        read_paths_file(written, num_layers=4)
    with pytest.raises(ValueError, match=r"outside \[0, --num-experts 3\)"):
        read_paths_file(written, num_experts=3)
    np.save(tmp_path / "flat.npy", np.arange(3))
    with pytest.raises(ValueError, match="integer array"):
        read_paths_file(str(tmp_path / "flat.npy"))
    with pytest.raises(FileNotFoundError, match="record_paths"):
        read_paths_file(str(tmp_path / "missing.npy"))


def test_config_refuses_bad_restrictions(tmp_path):
    written = write_paths_file(str(tmp_path / "p"), np.zeros((3, 4), int), [1, 1, 1], {})
    base = dict(num_layers=4, num_experts=4, moe_path_restriction=written)
    PathMoEConfig(routing="path", **base).validate()
    cases = [
        (dict(routing="path", num_layers=8), "over 4 layers"),
        (dict(routing="mono"), "--routing mono reuses"),
        (dict(routing="path", pipeline_model_parallel_size=2), "pipeline-model-parallel-size 1"),
        (dict(routing="path", moe_path_restriction_top_k=4), "between 1 and the 3 paths"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            PathMoEConfig(**{**base, **overrides}).validate()


# --------------------------------------------------------------------------- counting

def test_sorted_counts_most_frequent_first_ties_by_path():
    counts = {np.array(p, np.int32).tobytes(): c
              for p, c in (([1, 0], 2), ([0, 3], 5), ([0, 1], 2), ([2, 2], 1))}
    result = sorted_path_counts(counts, 10, 2)
    np.testing.assert_array_equal(result.paths, [[0, 3], [0, 1], [1, 0], [2, 2]])
    np.testing.assert_array_equal(result.counts, [5, 2, 2, 1])


def test_counted_paths_of_a_fully_shared_mono_model(megatron_world1):
    """MonoB8 routes once for all 8 layers: every path is constant, and the path counts are
    the first layer's top-1 histogram."""
    model = build("mono", TINY["num_layers"], seed=1)
    first = []
    handle = routers(model)[0].register_forward_hook(
        lambda m, i, out: first.append(out[0].argmax(-1)))
    counts = paths_of(model)
    handle.remove()
    assert counts.num_tokens == counts.counts.sum() == first[0].numel()
    assert all((row == row[0]).all() for row in counts.paths)
    histogram = torch.bincount(first[0], minlength=TINY["num_experts"])
    assert {int(r[0]): int(c) for r, c in zip(counts.paths, counts.counts)} \
        == {e: int(c) for e, c in enumerate(histogram) if c}


# --------------------------------------------------------------------------- mapping

def _restricted_routers(tmp_path, paths, topk, routing="independent", num_layers=2):
    written = write_paths_file(str(tmp_path / "allowed"), np.array(paths),
                               [1] * len(paths), {})
    routers_ = make_routers(routing, num_layers=num_layers, topk=topk,
                            moe_path_restriction=written)
    for r in routers_:
        set_(r.weight, EYE)  # logits = x
    return routers_


def selected(routing_map) -> list[set[int]]:
    return [set(np.flatnonzero(row)) for row in routing_map.numpy()]


def test_golden_mapping_follows_the_best_open_path(megatron_world1, tmp_path):
    """Allowed paths (0, 1) and (2, 3); logits = x."""
    first, second = _restricted_routers(tmp_path, [[0, 1], [2, 3]], topk=1)
    x1 = tokens([0.0, 9.0, 1.0, 0.0],   # free choice 1 is on no path: best allowed is 2
                [5.0, 0.0, 4.0, 0.0],   # 0 is allowed and best
                [0.0, 0.0, 3.0, 9.0])   # 3 is not a layer-1 expert: 2
    probs1, map1 = first(x1)
    assert selected(map1) == [{2}, {0}, {2}]
    x2 = tokens([0.0, 9.0, 0.0, 1.0],   # path (2, 3) is the only one open: 3, not 1
                [0.0, 1.0, 0.0, 9.0],   # path (0, 1) is the only one open: 1, not 3
                [9.0, 9.0, 9.0, 0.0])   # path (2, 3): 3 although it scores lowest
    probs2, map2 = second(x2)
    assert selected(map2) == [{3}, {1}, {3}]
    # The gate weight is the router's own probability of the chosen expert.
    expected = torch.softmax(x2.squeeze(1), -1)[torch.arange(3), torch.tensor([3, 1, 3])]
    torch.testing.assert_close(probs2.sum(-1), expected)


def test_golden_mapping_top2_frees_the_second_expert(megatron_world1, tmp_path):
    first, second = _restricted_routers(tmp_path, [[0, 1], [2, 3]], topk=2)
    _, map1 = first(tokens([0.0, 9.0, 1.0, 0.0], [5.0, 6.0, 4.0, 0.0]))
    assert selected(map1) == [{2, 1}, {0, 1}]  # path expert + best other
    _, map2 = second(tokens([0.0, 9.0, 0.0, 1.0], [0.0, 0.0, 8.0, 9.0]))
    assert selected(map2) == [{3, 1}, {1, 3}]


def test_restricted_model_only_follows_allowed_paths(megatron_world1, tmp_path):
    free = build("path", 4, seed=5, moe_router_topk=1)
    recorded = paths_of(free)
    allowed = recorded.paths[:2]
    written = write_paths_file(str(tmp_path / "top2"), allowed, recorded.counts[:2], {})
    for top_k, topk in ((None, 1), (1, 1), (None, 2)):
        restricted = build("path", 4, seed=6, moe_router_topk=topk,
                           moe_path_restriction=written, moe_path_restriction_top_k=top_k)
        restricted.load_state_dict(free.state_dict())
        keep = allowed[:top_k] if top_k else allowed
        if topk == 1:
            observed = paths_of(restricted)
            assert {tuple(p) for p in observed.paths} <= {tuple(p) for p in keep}
            continue
        maps = []
        handles = [r.register_forward_hook(lambda m, i, out: maps.append(out[1]))
                   for r in routers(restricted)]
        forward(restricted, batch())
        for h in handles:
            h.remove()
        on_path = torch.stack([torch.stack([maps[l][:, e] for l, e in enumerate(p)]).all(0)
                               for p in keep]).any(0)
        assert bool(on_path.all()), "every token's selected experts contain an allowed path"


def test_restricted_model_trains(megatron_world1, tmp_path):
    written = write_paths_file(str(tmp_path / "one"), np.zeros((1, TINY["num_layers"]), int),
                               [1], {})
    model = build("path", 4, seed=7, moe_path_restriction=written, moe_aux_loss_coeff=0.01)
    tokens_, positions = batch()
    loss = model(tokens_, positions, None, labels=tokens_).mean()
    loss.backward()
    assert torch.isfinite(loss) and routers(model)[0].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- workflow

def test_record_then_continue_training_restricted(demo_data, tmp_path):
    """Train with --save, record the paths of the checkpoint, resume restricted."""
    from tests.conftest import run_cli
    from tests.distributed.test_data_parallel import TINY_ARGS

    data = ["--data-path", demo_data["train_prefix"], "--tokenizer-model", demo_data["tokenizer"]]
    common = ["-m", "megatron_pathmoe.training.pretrain", *TINY_ARGS, *data,
              "--valid-data-path", demo_data["valid_prefix"], "--save", str(tmp_path / "ckpt")]
    first = run_cli([*common, "--train-iters", "2"])
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    stem = tmp_path / "paths" / "top"
    rec = run_cli(["-m", "megatron_pathmoe.analysis.record_paths", "--load",
                   str(tmp_path / "ckpt"), "--data-path", demo_data["valid_prefix"],
                   "--num-tokens", "512", "--top-k", "2", "--output", str(stem),
                   "--micro-batch-size", "2"])
    assert rec.returncode == 0, rec.stdout[-2000:] + rec.stderr[-3000:]
    meta = json.loads((tmp_path / "paths" / "top.json").read_text())
    assert meta["num_tokens"] == 512 and meta["iteration"] == 2 and len(meta["counts"]) == 2
    assert sum(meta["counts"]) / 512 == pytest.approx(meta["coverage"])
    summary = tmp_path / "restricted.json"
    second = run_cli([*common, "--train-iters", "4", "--load", str(tmp_path / "ckpt"),
                      "--moe-path-restriction", str(stem) + ".npy", "--summary-json",
                      str(summary)])
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    result = json.loads(summary.read_text())
    assert result["start_iteration"] == 2 and len(result["train_losses"]) == 2
