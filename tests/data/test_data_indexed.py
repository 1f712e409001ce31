"""The streaming index writer against megatron-core's builder, merging, and rejecting broken pairs."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_pathmoe.data import (
    DataError, IndexWriter, check_indexed_dataset, inspect_dataset, merge_datasets, parse_blend,
)
from megatron_pathmoe.data import indexed

REPO = Path(__file__).resolve().parents[2]
INSPECT = str(REPO / "tools" / "inspect_data.py")


def _random_documents(seed: int, count: int, vocab: int) -> list[list[np.ndarray]]:
    """Documents of 1-3 sequences; some sequences long, a few empty documents of one empty sequence."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(count):
        n_seq = int(rng.integers(1, 4))
        docs.append([rng.integers(0, vocab, int(rng.integers(0, 300))) for _ in range(n_seq)])
    return docs


def _with_megatron(docs, prefix: str, dtype) -> None:
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for seqs in docs:
        builder.add_document(np.concatenate(seqs), [len(s) for s in seqs])
    builder.finalize(prefix + ".idx")


def _with_writer(docs, prefix: str, dtype, batches: int = 3) -> None:
    writer = IndexWriter(prefix + ".bin", prefix + ".idx", dtype)
    for part in np.array_split(np.arange(len(docs)), batches):
        chosen = [docs[i] for i in part]
        flat = [s for seqs in chosen for s in seqs]
        writer.add_documents(np.concatenate(flat) if flat else np.zeros(0, dtype), [len(s) for s in flat],
                             [len(seqs) for seqs in chosen])
    writer.finalize()


def _same_bytes(a: str, b: str) -> bool:
    return all(Path(a + ext).read_bytes() == Path(b + ext).read_bytes() for ext in (".bin", ".idx"))


@pytest.mark.parametrize("dtype, vocab", [(np.uint16, 65000), (np.int32, 200_000)])
def test_writer_bytes_equal_megatron_builder(tmp_path, dtype, vocab, monkeypatch):
    monkeypatch.setattr(indexed, "WINDOW", 7)  # exercise the windowed pointer/validation code
    docs = _random_documents(0, 60, vocab)
    _with_megatron(docs, str(tmp_path / "ref"), dtype)
    _with_writer(docs, str(tmp_path / "ours"), dtype)
    assert _same_bytes(str(tmp_path / "ref"), str(tmp_path / "ours"))
    info = check_indexed_dataset(str(tmp_path / "ours"))
    assert (info.documents, info.sequence_count) == (60, sum(len(d) for d in docs))
    ds = IndexedDataset(str(tmp_path / "ours"))  # items are sequences; document 5 starts here:
    assert np.array_equal(ds[int(ds.document_indices[5])], docs[5][0]) and ds.index.dtype == dtype


def test_merge_equals_megatron_add_index(tmp_path):
    parts = [_random_documents(seed, 25, 4096) for seed in (1, 2, 3)]
    prefixes = []
    for i, docs in enumerate(parts):
        prefixes.append(str(tmp_path / f"part{i}"))
        _with_writer(docs, prefixes[-1], np.uint16)
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for prefix in prefixes:
        builder.add_index(prefix)
    builder.finalize(str(tmp_path / "ref.idx"))
    summary = merge_datasets(prefixes, str(tmp_path / "merged"), quiet=True)
    assert _same_bytes(str(tmp_path / "ref"), str(tmp_path / "merged"))
    assert summary["documents"] == 75
    # A folder merges its pairs in sorted order; a dtype mismatch is refused.
    folder = tmp_path / "folder"
    folder.mkdir()
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            shutil.copy(prefix + ext, folder / (Path(prefix).name + ext))
    merge_datasets([str(folder)], str(tmp_path / "from_folder"), quiet=True)
    assert _same_bytes(str(tmp_path / "ref"), str(tmp_path / "from_folder"))
    _with_writer(parts[0], str(tmp_path / "wide"), np.int32)
    with pytest.raises(DataError, match="different token dtypes"):
        merge_datasets([prefixes[0], str(tmp_path / "wide")], str(tmp_path / "bad"), quiet=True)
    assert not list(tmp_path.glob("bad*"))


def _corrupt(prefix: str, how: str) -> None:
    idx, binf = Path(prefix + ".idx"), Path(prefix + ".bin")
    raw = bytearray(idx.read_bytes())
    n = struct.unpack_from("<Q", raw, 18)[0]
    if how == "truncated idx":
        idx.write_bytes(raw[: len(raw) - 5])
    elif how == "short header":
        idx.write_bytes(raw[:20])
    elif how == "bad magic":
        idx.write_bytes(b"XXXXXXXXX" + raw[9:])
    elif how == "bad version":
        idx.write_bytes(raw[:9] + struct.pack("<Q", 2) + raw[17:])
    elif how == "bad dtype":
        raw[17] = 42
        idx.write_bytes(raw)
    elif how == "truncated bin":
        binf.write_bytes(binf.read_bytes()[:-2])
    elif how == "pointers not monotone":
        struct.pack_into("<q", raw, 34 + 4 * n + 8 * 3, 2)
        idx.write_bytes(raw)
    elif how == "doc index past end":
        struct.pack_into("<q", raw, len(raw) - 8, n + 1)
        idx.write_bytes(raw)


CORRUPTIONS = ["truncated idx", "short header", "bad magic", "bad version", "bad dtype", "truncated bin",
               "pointers not monotone", "doc index past end"]


@pytest.fixture
def valid_copy(demo_data, tmp_path) -> str:
    prefix = str(tmp_path / "copy_text_document")
    for ext in (".bin", ".idx"):
        shutil.copy(demo_data["valid_prefix"] + ext, prefix + ext)
    return prefix


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_pairs_are_rejected_by_validator_and_training(valid_copy, how):
    check_indexed_dataset(valid_copy)
    _corrupt(valid_copy, how)
    with pytest.raises(DataError) as err:
        check_indexed_dataset(valid_copy, "--data-path")
    message = str(err.value)
    assert "--data-path" in message and "truncated or corrupt" in message and "\n" not in message
    with pytest.raises(DataError, match="truncated or corrupt"):
        parse_blend([valid_copy], "--data-path")  # what training runs before building datasets


def test_training_cli_turns_a_corrupt_dataset_into_one_line(valid_copy, demo_data, capsys):
    from megatron_pathmoe.training.arguments import parse_args

    _corrupt(valid_copy, "truncated bin")
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--device", "cpu", "--data-path", valid_copy, "--tokenizer-model", demo_data["tokenizer"]])
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--data-path" in line and valid_copy + ".bin" in line and "truncated or corrupt" in line


def test_inspector_reports_stats_and_first_document(demo_data, tokenizer):
    report = inspect_dataset(demo_data["valid_prefix"], tokenizer.encoder, documents=2)
    ds = IndexedDataset(demo_data["valid_prefix"])
    lengths = ds.sequence_lengths
    assert report["documents"] == len(ds) and report["tokens"] == int(lengths.sum())
    assert report["document_tokens"]["max"] == int(lengths.max())
    assert report["document_tokens"]["mean"] == pytest.approx(lengths.mean())
    assert report["eod_count"] == len(ds)  # one EOD per document
    assert report["first_documents"][1] == ds[1].tolist()
    assert report["first_texts"][0] == tokenizer.detokenize(ds[0])
    assert report["max_token_id"] < tokenizer.vocab_size


def test_inspector_cli(valid_copy, demo_data):
    ok = subprocess.run([sys.executable, INSPECT, valid_copy + ".idx", "--tokenizer-model", demo_data["tokenizer"]],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "valid" in ok.stdout and "documents" in ok.stdout and "--- document 0" in ok.stdout
    assert "Twelfth Night" in ok.stdout or ":" in ok.stdout.split("--- document 0", 1)[1]
    _corrupt(valid_copy, "truncated idx")
    bad = subprocess.run([sys.executable, INSPECT, valid_copy], capture_output=True, text=True)
    assert bad.returncode == 2 and "truncated or corrupt" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    help_text = subprocess.run([sys.executable, INSPECT, "--help"], capture_output=True, text=True).stdout
    assert "--tokenizer-model" in help_text and "--documents" in help_text


def test_inspector_rejects_ids_outside_the_vocabulary(tmp_path, tokenizer):
    prefix = str(tmp_path / "wide")
    _with_writer([[np.array([1, 2, 70000])]], prefix, np.int32, batches=1)
    with pytest.raises(DataError, match="outside the vocabulary"):
        inspect_dataset(prefix, tokenizer.encoder)


def test_empty_dataset_is_valid_but_not_trainable(tmp_path):
    prefix = str(tmp_path / "empty")
    _with_writer([], prefix, np.uint16, batches=1)
    assert os.path.getsize(prefix + ".bin") == 0
    assert check_indexed_dataset(prefix).documents == 0
    with pytest.raises(DataError, match="no tokens"):
        parse_blend([prefix], "--data-path")
