"""Data sources beyond --data-path: --mock-data (megatron-core's MockGPTDataset, no files),
--test-data-path (evaluated once after training) and --num-workers (a torch DataLoader over
the pretraining sampler: the same batches as reading in-process)."""

from __future__ import annotations

import math
from itertools import islice

import pytest
import torch

from megatron_pathmoe.data import build_gpt_datasets, make_data_iterator
from tests.training.cluster_runs import data_args, run, summary

SEQ = 32


@pytest.fixture(scope="module")
def mock_train():
    from megatron_pathmoe.data import load_tokenizer

    tokenizer = load_tokenizer("data/shakespeare/tokenizer.json")
    train, valid = build_gpt_datasets(None, None, tokenizer, SEQ, seed=3, train_samples=64,
                                      valid_samples=16)
    return tokenizer, train, valid


def test_mock_data_is_megatron_cores_mock_dataset(mock_train):
    from megatron.core.datasets.gpt_dataset import MockGPTDataset

    tokenizer, train, valid = mock_train
    assert isinstance(train, MockGPTDataset) and isinstance(valid, MockGPTDataset)
    assert len(train) >= 64 and len(valid) >= 16
    sample = train[0]
    assert sample["tokens"].shape == (SEQ,)
    assert int(sample["tokens"].max()) < tokenizer.vocab_size
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])  # shifted by one


@pytest.mark.parametrize("workers", [1, 2])
def test_num_workers_give_the_same_batches(mock_train, workers):
    """Rank 1 of DP 2, resumed after 6 samples: the DataLoader's workers keep the order."""
    _, train, _ = mock_train

    def batches(num_workers: int) -> list[dict]:
        it = make_data_iterator(train, 2, dp_rank=1, dp_size=2, consumed_samples=6,
                                num_workers=num_workers)
        return list(islice(it, 5))

    inline, loaded = batches(0), batches(workers)
    for a, b in zip(inline, loaded, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The sampler's order: micro-step j of rank 1 reads samples 6 + 4j + 2, 6 + 4j + 3.
    assert torch.equal(inline[1]["tokens"][0], train[6 + 4 + 2]["tokens"])


def test_test_data_is_evaluated_once_after_training_with_workers(demo_data, tmp_path):
    """--test-data-path = the validation files: the test loss equals the final validation
    loss; --num-workers 2 trains on the same batches as the in-process reader; --manual-gc
    --manual-gc-interval 2 changes no number and collects at the start, after step 2 and
    around the validation and the test evaluation (6 times)."""
    common = [*data_args(demo_data), "--train-iters", "3"]
    with_test, plain = tmp_path / "test.json", tmp_path / "plain.json"
    out = run([*common, "--test-data-path", demo_data["valid_prefix"], "--num-workers", "2",
               "--manual-gc", "--manual-gc-interval", "2", "--summary-json", str(with_test)])
    run([*common, "--summary-json", str(plain)])
    tested, reference = summary(with_test), summary(plain)
    assert tested["train_losses"] == reference["train_losses"]
    assert tested["test_loss"] == tested["valid_loss"] == reference["valid_loss"]
    assert tested["test_perplexity"] == pytest.approx(math.exp(tested["test_loss"]))
    assert reference["test_loss"] is None
    assert out.count("test: loss") == 1
    assert (tested["manual_gc_collections"], reference["manual_gc_collections"]) == (6, None)


def test_manual_gc_turns_the_collector_off_and_collects_at_its_points(monkeypatch):
    import gc

    from megatron_pathmoe.training.cluster import ClusterConfig, ManualGC

    collected = []
    monkeypatch.setattr(gc, "collect", lambda *a: collected.append(gc.isenabled()) or 0)
    assert gc.isenabled()
    manual = ManualGC(ClusterConfig(manual_gc=True, manual_gc_interval=3))
    try:
        manual.start()
        assert not gc.isenabled()
        for iteration in range(1, 8):
            manual.after_step(iteration)  # collects after steps 3 and 6
        with manual.around_evaluation():
            assert manual.collections == 4
    finally:
        manual.close()
    assert gc.isenabled() and collected == [False] * 5 and manual.collections == 5
    quiet = ManualGC(ClusterConfig(manual_gc=True, manual_gc_eval=False))
    quiet.start()
    quiet.after_step(3)
    with quiet.around_evaluation():
        pass
    quiet.close()
    assert quiet.collections == 1 and gc.isenabled()
    off = ManualGC(ClusterConfig())
    off.start()
    assert gc.isenabled()
    off.after_step(3)
    off.close()
    assert off.collections == 0


def test_mock_data_trains_without_any_file(tmp_path):
    """--mock-data with NullTokenizer (Megatron-LM's no-files recipe): no data, no tokenizer
    file; the vocabulary comes from --vocab-size."""
    out = run(["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "512",
               "--train-iters", "2", "--summary-json", str(tmp_path / "s.json")])
    result = summary(tmp_path / "s.json")
    assert len(result["train_losses"]) == 2 and math.isfinite(result["valid_loss"])
    # Untrained on synthetic tokens: about ln(padded vocabulary), 513 ids padded up.
    assert math.log(513) - 0.2 < result["train_losses"][0] < math.log(1024)
    assert "WARNING" not in out


@pytest.mark.parametrize("argv, flag", [
    (["--mock-data", "--data-path", "x"], "--mock-data"),
    (["--data-path", "{train}", "--test-data-path", "/nonexistent/prefix"], "--test-data-path"),
    (["--mock-data", "--num-workers", "-1"], "--num-workers"),
    (["--mock-data", "--manual-gc-interval", "5"], "--manual-gc-interval needs --manual-gc"),
    (["--mock-data", "--manual-gc", "--manual-gc-interval", "-1"], "--manual-gc-interval"),
], ids=["mock-and-data-path", "missing-test-files", "negative-workers", "gc-interval-alone",
        "negative-gc-interval"])
def test_bad_data_sources_are_one_line_errors(demo_data, argv, flag, capsys):
    from megatron_pathmoe.training.arguments import parse_args

    argv = [a.format(train=demo_data["train_prefix"]) for a in argv]
    with pytest.raises(SystemExit) as exc:
        parse_args(["--device", "cpu", "--tokenizer-model", demo_data["tokenizer"], *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0]
