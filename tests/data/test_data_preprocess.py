"""preprocess(): megatron-readable output, the documented .idx layout, determinism, bad input."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_pathmoe.data import DataError, preprocess

REPO = Path(__file__).resolve().parents[2]
CLI = str(REPO / "tools" / "preprocess_data.py")


def write_jsonl(path: Path, records: list) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def _run(src, out_dir, tokenizer_path, **kw) -> dict:
    return preprocess(src, str(Path(out_dir) / "corpus"), tokenizer_path, quiet=True, **kw)


def test_output_matches_direct_tokenization(small_jsonl, small_docs, tokenizer, tmp_path):
    summary = _run(small_jsonl, tmp_path, tokenizer.path)
    prefix = summary["prefixes"]["text"]
    assert prefix == str(tmp_path / "corpus_text_document")
    non_empty = [d["text"] for d in small_docs if d["text"]]
    assert summary["documents"] == len(non_empty) == 40
    assert summary["empty_documents"] == 1
    assert summary["dtype"] == "uint16"

    ds = IndexedDataset(prefix)
    assert ds.index.dtype == np.uint16
    assert len(ds) == len(non_empty)
    assert list(ds.document_indices) == list(range(len(non_empty) + 1))
    for i, text in enumerate(non_empty):
        expected = tokenizer.tokenize(text) + [tokenizer.eod]
        assert ds[i].tolist() == expected
    assert summary["tokens"] == int(ds.sequence_lengths.sum())
    assert summary["bytes"] == os.path.getsize(prefix + ".bin") + os.path.getsize(prefix + ".idx")
    expected_files = ["corpus_text_document.bin", "corpus_text_document.idx", "small.jsonl"]
    assert sorted(os.listdir(tmp_path)) == expected_files  # no temporary files left


def test_idx_header_follows_documented_format(small_jsonl, tokenizer, tmp_path):
    prefix = _run(small_jsonl, tmp_path, tokenizer.path)["prefixes"]["text"]
    raw = Path(prefix + ".idx").read_bytes()
    ds = IndexedDataset(prefix)  # keep alive: its arrays are views into a mmap closed on __del__
    lengths = ds.sequence_lengths.astype(np.int64)
    n = len(lengths)
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, dtype_code, seq_count, doc_count = struct.unpack("<QBQQ", raw[9:34])
    assert (version, dtype_code, seq_count, doc_count) == (1, 8, n, n + 1)  # 8 = uint16
    off = 34
    seq_lens = np.frombuffer(raw, "<i4", n, off)
    pointers = np.frombuffer(raw, "<i8", n, off + 4 * n)
    doc_idx = np.frombuffer(raw, "<i8", n + 1, off + 12 * n)
    assert len(raw) == off + 12 * n + 8 * (n + 1)
    np.testing.assert_array_equal(seq_lens, lengths)
    np.testing.assert_array_equal(pointers, np.concatenate([[0], np.cumsum(lengths * 2)[:-1]]))
    np.testing.assert_array_equal(doc_idx, np.arange(n + 1))
    assert os.path.getsize(prefix + ".bin") == 2 * lengths.sum()


def test_workers_do_not_change_bytes(small_jsonl, tokenizer, tmp_path):
    one = _run(small_jsonl, tmp_path / "w1", tokenizer.path, workers=1)["prefixes"]["text"]
    two = _run(small_jsonl, tmp_path / "w2", tokenizer.path, workers=2)["prefixes"]["text"]
    for ext in (".bin", ".idx"):
        assert Path(one + ext).read_bytes() == Path(two + ext).read_bytes()


def test_gzip_input_multiple_keys_and_no_eod(small_docs, tokenizer, tmp_path):
    src = tmp_path / "in.jsonl.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        for d in small_docs[:8]:
            f.write(json.dumps(d) + "\n")
    summary = _run(str(src), tmp_path, tokenizer.path, json_keys=("text", "title"), append_eod=False)
    texts = IndexedDataset(summary["prefixes"]["text"])
    titles = IndexedDataset(summary["prefixes"]["title"])
    assert summary["per_key"]["text"]["documents"] == 7  # small_docs[7] is empty
    assert summary["per_key"]["title"]["documents"] == 8
    assert titles[4].tolist() == tokenizer.tokenize(small_docs[4]["title"])
    assert tokenizer.eod not in texts[0].tolist()


def _assert_no_outputs(directory: Path) -> None:
    leftovers = [p for p in os.listdir(directory) if "corpus" in p]
    assert leftovers == []


def test_malformed_json_names_file_and_line(small_docs, tokenizer, tmp_path):
    # Past the first worker chunk (32 docs), so earlier data was already written to temp files.
    records = small_docs[:35] + ['{"text": "unterminated'] + small_docs[35:]
    src = write_jsonl(tmp_path / "bad.jsonl", records)
    for workers in (1, 2):
        with pytest.raises(DataError) as err:
            _run(src, tmp_path, tokenizer.path, workers=workers)
        assert f"{src}:36:" in str(err.value) and "malformed JSON" in str(err.value)
        _assert_no_outputs(tmp_path)


def test_missing_key_and_non_object(tokenizer, tmp_path):
    src = write_jsonl(tmp_path / "nokey.jsonl", [{"text": "fine"}, {"body": "wrong field"}])
    with pytest.raises(DataError) as err:
        _run(src, tmp_path, tokenizer.path)
    assert f"{src}:2:" in str(err.value) and "'text'" in str(err.value) and "--json-keys" in str(err.value)
    _assert_no_outputs(tmp_path)
    src = write_jsonl(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=r"list.jsonl:1: expected a JSON object"):
        _run(src, tmp_path, tokenizer.path)


def test_missing_tokenizer_or_input(small_jsonl, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="--tokenizer-model"):
        _run(small_jsonl, tmp_path, str(tmp_path / "missing.json"))
    with pytest.raises(DataError, match="--input"):
        _run(str(tmp_path / "missing.jsonl"), tmp_path, tokenizer.path)


def test_cli_help_and_error_exit(small_jsonl, tmp_path):
    out = subprocess.run([sys.executable, CLI, "--help"], capture_output=True, text=True, check=True)
    for flag in ("--input", "--json-keys", "--output-prefix", "--tokenizer-type", "--tokenizer-model",
                 "--append-eod", "--workers", "--log-interval"):
        assert flag in out.stdout
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import preprocess_data
    finally:
        sys.path.remove(str(REPO / "tools"))
    args = ["--input", small_jsonl, "--output-prefix", str(tmp_path / "cli"), "--tokenizer-model",
            str(tmp_path / "missing.json")]
    assert preprocess_data.main(args) == 2
