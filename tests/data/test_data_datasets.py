"""build_gpt_datasets, the DP iterator, prefix validation and the unigram baseline."""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil

import numpy as np
import pytest
import torch

from megatron_pathmoe.data import (
    DataError,
    build_gpt_datasets,
    make_data_iterator,
    parse_blend,
    token_stream,
    unigram_cross_entropy,
    validate_data_prefix,
)

SEQ = 64


def _contains(stream: np.ndarray, window: np.ndarray) -> bool:
    starts = np.flatnonzero(stream[: len(stream) - len(window) + 1] == window[0])
    return any(np.array_equal(stream[s : s + len(window)], window) for s in starts)


def _full_sample(sample: dict) -> np.ndarray:
    """The seq_length + 1 tokens a GPT sample was cut from."""
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    return torch.cat([sample["tokens"], sample["labels"][-1:]]).numpy()


@pytest.fixture(scope="module")
def per_split(demo_data, tokenizer, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    return build_gpt_datasets([demo_data["train_prefix"]], [demo_data["valid_prefix"]], tokenizer,
                              SEQ, seed=1, train_samples=500, valid_samples=50, cache_dir=cache)


def test_blend_per_split_samples_come_from_the_right_split(per_split, demo_data):
    train, valid = per_split
    assert len(train) >= 500 and len(valid) >= 50
    train_stream = token_stream(demo_data["train_prefix"])
    valid_stream = token_stream(demo_data["valid_prefix"])
    for ds, own, other in ((train, train_stream, valid_stream), (valid, valid_stream, train_stream)):
        for i in (0, 1, len(ds) // 2):
            sample = ds[i]
            assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}  # no attention_mask
            assert sample["tokens"].shape == (SEQ,) and sample["tokens"].dtype == torch.int64
            assert torch.equal(sample["position_ids"], torch.arange(SEQ))
            assert bool((sample["loss_mask"] == 1).all())
            window = _full_sample(sample)
            assert _contains(own, window) and not _contains(other, window)


def test_split_string_carves_disjoint_documents(demo_data, tokenizer, tmp_path):
    train, valid = build_gpt_datasets(demo_data["train_prefix"], None, tokenizer, SEQ, seed=3,
                                      train_samples=100, valid_samples=20, split="80,20,0",
                                      cache_dir=str(tmp_path))
    n_docs = len(train.dataset)
    boundary = round(0.8 * n_docs)
    assert list(train.indices) == list(range(boundary))
    assert list(valid.indices) == list(range(boundary, n_docs))
    assert _contains(token_stream(valid), _full_sample(valid[0]))
    assert not _contains(token_stream(train), _full_sample(valid[0]))


def test_weighted_blend_and_determinism(demo_data, tokenizer, tmp_path):
    blend = ["0.7", demo_data["train_prefix"], "0.3", demo_data["valid_prefix"]]
    assert parse_blend(blend)[1] == [0.7, 0.3]
    assert parse_blend(" ".join(blend)) == parse_blend(blend)
    runs = [build_gpt_datasets(blend, None, tokenizer, SEQ, seed=5, train_samples=200,
                               valid_samples=10, cache_dir=str(tmp_path / f"c{k}"))[0] for k in range(2)]
    assert len(runs[0]) == 200
    ids = np.array([int(runs[0][i]["dataset_id"]) for i in range(200)])
    assert 0.6 < (ids == 0).mean() < 0.8
    for i in (0, 17, 199):
        assert torch.equal(runs[0][i]["tokens"], runs[1][i]["tokens"])


def _batches(ds, mbs, rank, dp, steps, consumed=0):
    it = make_data_iterator(ds, mbs, rank, dp, consumed_samples=consumed)
    return [next(it) for _ in range(steps)]


def test_iterator_order_is_independent_of_dp_size(per_split):
    train, _ = per_split
    single = _batches(train, 2, 0, 1, steps=6)
    rank0 = _batches(train, 2, 0, 2, steps=3)
    rank1 = _batches(train, 2, 1, 2, steps=3)
    for j in range(3):
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            combined = torch.cat([rank0[j][key], rank1[j][key]])
            assert torch.equal(combined, torch.cat([single[2 * j][key], single[2 * j + 1][key]]))
    b = single[0]
    assert b["tokens"].shape == (2, SEQ) and b["tokens"].dtype == torch.int64
    assert b["labels"].dtype == torch.int64 and b["position_ids"].dtype == torch.int64
    assert b["loss_mask"].dtype == torch.float32
    assert torch.equal(b["tokens"][0], train[0]["tokens"]) and torch.equal(b["tokens"][1], train[1]["tokens"])


def test_iterator_resumes_and_cycles(per_split):
    _, valid = per_split
    n = len(valid)
    assert torch.equal(_batches(valid, 3, 1, 2, steps=3)[2]["tokens"],
                       _batches(valid, 3, 1, 2, steps=1, consumed=12)[0]["tokens"])
    # Past the end it wraps around to the same order.
    wrapped = _batches(valid, 1, 0, 1, steps=1, consumed=n + 4)[0]["tokens"][0]
    assert torch.equal(wrapped, valid[4]["tokens"])
    with pytest.raises(ValueError):
        next(make_data_iterator(valid, 2, 2, 2))


def test_missing_files_name_flag_and_file(demo_data, tokenizer, tmp_path):
    prefix = str(tmp_path / "copy")
    shutil.copy(demo_data["valid_prefix"] + ".idx", prefix + ".idx")
    with pytest.raises(DataError) as err:
        validate_data_prefix(prefix, "--data-path")
    assert "--data-path" in str(err.value) and prefix + ".bin" in str(err.value)
    assert "tools/preprocess_data.py" in str(err.value)
    os.rename(prefix + ".idx", prefix + ".bin")
    with pytest.raises(ValueError, match=r"--valid-data-path .*missing .*copy\.idx"):
        build_gpt_datasets([demo_data["train_prefix"]], [prefix], tokenizer, SEQ, 1, 10, 10)
    with pytest.raises(DataError, match="without the extension"):
        validate_data_prefix(prefix + ".bin", "--data-path")


def test_unigram_baseline(demo_data, tokenizer, per_split):
    v = tokenizer.vocab_size
    ce = unigram_cross_entropy(demo_data["train_prefix"], v, eval_tokens=demo_data["valid_prefix"])
    assert math.isfinite(ce) and 0 < ce < math.log(v)
    # Scored on its own training tokens the fit is (slightly) better than on held-out text.
    assert unigram_cross_entropy(demo_data["train_prefix"], v) < ce
    # A GPTDataset contributes only its split's documents.
    train, _ = per_split
    assert token_stream(train).size == token_stream(demo_data["train_prefix"]).size
    # Exact value on a toy stream (no smoothing): p = (2/3, 1/3).
    expected = -(2 * math.log(2 / 3) + math.log(1 / 3)) / 3
    assert unigram_cross_entropy([0, 0, 1], 2, smoothing=0.0) == pytest.approx(expected)


def test_eod_mask_loss_masks_predictions_from_the_end_of_document(demo_data, tokenizer,
                                                                   tmp_path):
    """--eod-mask-loss: megatron-core's loss mask is 0 exactly where the input token is EOD;
    the tokens themselves are those of the unmasked dataset."""
    from megatron_pathmoe.training.arguments import parse_args

    datasets = [build_gpt_datasets(demo_data["train_prefix"], None, tokenizer, SEQ, seed=1,
                                   train_samples=200, valid_samples=10,
                                   cache_dir=str(tmp_path / "cache"), eod_mask_loss=masked)[0]
                for masked in (False, True)]
    eod = tokenizer.eod
    seen = 0
    for i in range(len(datasets[1])):
        plain, sample = datasets[0][i], datasets[1][i]
        assert torch.equal(plain["tokens"], sample["tokens"])
        assert torch.equal(sample["loss_mask"], (sample["tokens"] != eod).float())
        seen += int((sample["tokens"] == eod).sum())
        if seen > 3:
            break
    assert seen > 3  # documents end inside the samples checked
    _, train = parse_args(["--dry-run", "--dry-run-vocab-size", "128", "--eod-mask-loss"])
    assert train.eod_mask_loss


def _distributed_worker(rank, world, init_file, demo_data, tokenizer_path, cache, queue):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world)
    try:
        train, valid = build_gpt_datasets([demo_data["train_prefix"]], [demo_data["valid_prefix"]],
                                          tokenizer_path, SEQ, 1, 500, 50, cache_dir=cache)
        batch = next(make_data_iterator(train, 2, rank, world))
        queue.put((rank, len(train), len(valid), batch["tokens"].numpy()))
    finally:
        torch.distributed.destroy_process_group()


def test_build_under_initialized_process_group(per_split, demo_data, tokenizer_path, tmp_path):
    # Spawned, not forked: the workers must not inherit the process group that session-scoped
    # fixtures of the full suite leave initialized in this process.
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    args = (2, str(tmp_path / "init"), demo_data, tokenizer_path, str(tmp_path / "cache"), queue)
    procs = [ctx.Process(target=_distributed_worker, args=(r, *args)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, rest) for r, *rest in (queue.get(timeout=60) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    train, valid = per_split
    reference = _batches(train, 4, 0, 1, steps=1)[0]["tokens"].numpy()
    for rank, (n_train, n_valid, tokens) in results.items():
        assert (n_train, n_valid) == (len(train), len(valid))
        np.testing.assert_array_equal(tokens, reference[2 * rank : 2 * rank + 2])
