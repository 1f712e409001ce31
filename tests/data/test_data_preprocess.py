"""preprocess(): megatron-readable output, the documented .idx layout, input formats, tokenizer
types, and bytes that do not depend on workers, block size or partitions."""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_pathmoe.data import preprocess
from megatron_pathmoe.data.progress import Progress

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


def _bytes(prefix: str) -> tuple[bytes, bytes]:
    return Path(prefix + ".bin").read_bytes(), Path(prefix + ".idx").read_bytes()


def test_workers_blocks_and_partitions_do_not_change_bytes(small_jsonl, tokenizer, tmp_path):
    reference = _bytes(_run(small_jsonl, tmp_path / "w1", tokenizer.path)["prefixes"]["text"])
    variants = {
        "workers": dict(workers=2, block_bytes=20_000),
        "partitions": dict(partitions=3, workers=2, block_bytes=30_000),  # one file cut at line starts
    }
    for name, options in variants.items():
        summary = _run(small_jsonl, tmp_path / name, tokenizer.path, **options)
        assert _bytes(summary["prefixes"]["text"]) == reference, name
        assert sorted(os.listdir(tmp_path / name)) == ["corpus_text_document.bin", "corpus_text_document.idx"]
    assert summary["partitions"] == 3
    # Partitions over several compressed files (each stays whole) give the same bytes as one pass.
    lines = Path(small_jsonl).read_text().splitlines(keepends=True)
    parts = []
    for i, chunk in enumerate((lines[:15], lines[15:16], lines[16:])):
        parts.append(str(tmp_path / f"part{i}.jsonl.gz"))
        with gzip.open(parts[-1], "wt") as f:
            f.writelines(chunk)
    split = _run(parts, tmp_path / "gz", tokenizer.path, partitions=2, workers=2)
    assert _bytes(split["prefixes"]["text"]) == reference and split["partitions"] == 2


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compressed_input_multiple_keys_and_no_eod(small_docs, tokenizer, tmp_path, suffix):
    payload = "".join(json.dumps(d) + "\n" for d in small_docs[:8]).encode()
    src = tmp_path / f"in.jsonl{suffix}"
    if suffix == ".gz":
        src.write_bytes(gzip.compress(payload))
    else:
        import zstandard

        src.write_bytes(zstandard.ZstdCompressor().compress(payload))
    summary = _run(str(src), tmp_path, tokenizer.path, json_keys=("text", "title"), append_eod=False)
    texts = IndexedDataset(summary["prefixes"]["text"])
    titles = IndexedDataset(summary["prefixes"]["title"])
    assert summary["per_key"]["text"]["documents"] == 7  # small_docs[7] is empty
    assert summary["per_key"]["title"]["documents"] == 8
    assert titles[4].tolist() == tokenizer.tokenize(small_docs[4]["title"])
    assert tokenizer.eod not in texts[0].tolist()


def test_text_inputs_one_document_per_file_or_paragraph(tokenizer, tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    texts = {"b.txt": "Second file.\n\nStill the second document.\n", "a.txt": "First file, one line.",
             "sub/c.txt": "Third, in a subfolder.\n"}
    for name, text in texts.items():
        (folder / name).write_text(text)
    per_file = _run(str(folder), tmp_path / "files", tokenizer.path, input_format="text-file")
    ds = IndexedDataset(per_file["prefixes"]["text"])
    assert [tokenizer.detokenize(ds[i][:-1]) for i in range(len(ds))] == [texts[k] for k in sorted(texts)]
    paragraphs = tmp_path / "paragraphs.txt"
    paragraphs.write_text("\n\nFirst paragraph,\ntwo lines.\n\n\n  \nSecond paragraph.\n\nThird.")
    per_paragraph = _run(str(paragraphs), tmp_path / "paras", tokenizer.path, input_format="text-paragraph",
                         json_keys=("body",))
    ds = IndexedDataset(per_paragraph["prefixes"]["body"])
    assert per_paragraph["prefixes"]["body"].endswith("corpus_body_document")
    assert [tokenizer.detokenize(ds[i][:-1]) for i in range(len(ds))] == [
        "First paragraph,\ntwo lines.", "Second paragraph.", "Third."]


def test_split_sentences_writes_one_sequence_per_sentence(tokenizer, tmp_path):
    docs = [{"text": "It is the east. And Juliet is the sun! Arise, fair sun? \"Yes.\" e.g. not split"},
            {"text": ["Pre-split", "sentences", ""]}]  # Megatron-LM accepts lists of sentences
    src = write_jsonl(tmp_path / "s.jsonl", docs)
    summary = _run(src, tmp_path, tokenizer.path, split_sentences=True)
    ds = IndexedDataset(summary["prefixes"]["text"])
    expected = [["It is the east.", "And Juliet is the sun!", "Arise, fair sun?", '"Yes." e.g. not split'],
                ["Pre-split", "sentences"]]
    assert list(ds.document_indices) == [0, 4, 6]
    sequences = [tokenizer.tokenize(s) for doc in expected for s in doc]
    sequences[3].append(tokenizer.eod)  # EOD ends the last sentence of each document
    sequences[5].append(tokenizer.eod)
    assert [ds[i].tolist() for i in range(len(ds))] == sequences


@pytest.mark.parametrize("kind", ["gpt2", "sentencepiece", "sentencepiece-legacy", "llama2", "llama2-legacy"])
def test_other_tokenizer_types_through_the_pipeline(kind, small_jsonl, small_docs, gpt2_files, spm_model,
                                                   tmp_path):
    from megatron_pathmoe.data import TokenizerSpec, load_tokenizer

    if kind == "gpt2":
        spec = TokenizerSpec("GPT2BPETokenizer", vocab_file=gpt2_files[0], merge_file=gpt2_files[1])
    else:
        name = "Llama2Tokenizer" if kind.startswith("llama2") else "SentencePieceTokenizer"
        spec = TokenizerSpec(name, spm_model, legacy=kind.endswith("-legacy"))
    summary = _run(small_jsonl, tmp_path, spec, workers=2)
    tok = load_tokenizer(spec)
    ds = IndexedDataset(summary["prefixes"]["text"])
    # As Megatron-LM: a document is kept when it has tokens, so with the legacy Llama2's BOS the
    # empty text is [bos, eod]; the legacy SentencePiece ends documents with its own <EOD>.
    expected = [ids + [tok.eod] for ids in (tok.tokenize(d["text"]) for d in small_docs) if ids]
    assert len(ds) == len(expected) == 40 + (kind == "llama2-legacy")
    if kind == "sentencepiece-legacy":  # <EOD> is the 3rd id past the model's 300 pieces
        assert ds[0].tolist()[-1] == tok.eod == 302
    for i in (0, 7, 17, len(expected) - 1):
        assert ds[i].tolist() == expected[i]


def test_null_tokenizer_through_the_cli(tmp_path):
    """--tokenizer-type NullTokenizer --vocab-size N writes the ids of the text; a text that is
    not ids stops the run at its file:line."""
    src = tmp_path / "ids.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("5 6 7", "0 9", "8")))
    base = [sys.executable, CLI, "--tokenizer-type", "NullTokenizer", "--vocab-size", "10",
            "--append-eod", "--quiet", "--output-prefix", str(tmp_path / "ids")]
    run = subprocess.run(base + ["--input", str(src)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    ds = IndexedDataset(str(tmp_path / "ids_text_document"))
    assert [ds[i].tolist() for i in range(len(ds))] == [[5, 6, 7, 10], [0, 9, 10], [8, 10]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "5 6"}) + "\n" + json.dumps({"text": "five"}) + "\n")
    run = subprocess.run(base + ["--input", str(bad)], capture_output=True, text=True)
    assert run.returncode != 0 and f"{bad}:2: " in run.stderr and "single spaces" in run.stderr


def test_cli_tokenizes_merges_and_reports(small_jsonl, tokenizer, tmp_path):
    base = [sys.executable, CLI, "--tokenizer-model", tokenizer.path, "--append-eod", "--workers", "2",
            "--log-interval", "10"]
    for name in ("a", "b"):
        run = subprocess.run(base + ["--input", small_jsonl, "--output-prefix", str(tmp_path / name)],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert "processed 40 documents (" in run.stderr  # stderr is no terminal: plain progress lines
        assert "done: 40 documents (1 empty skipped), " in run.stderr and "tokens/s" in run.stderr
    merged = subprocess.run([sys.executable, CLI, "--merge", str(tmp_path / "a_text_document"),
                             str(tmp_path / "b_text_document"), "--output-prefix", str(tmp_path / "ab")],
                            capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr
    ds = IndexedDataset(str(tmp_path / "ab"))
    assert len(ds) == 80 and ds[40].tolist() == ds[0].tolist()


def test_progress_bar_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = Progress(total_bytes=1000, stream=stream, log_interval=1)
    progress.update(docs=3, tokens=300, nbytes=600)
    progress.close()
    assert "60%" in stream.getvalue() and "docs/s" in stream.getvalue() and "tokens/s" in stream.getvalue()


def test_cli_help_and_error_exit(small_jsonl, tmp_path):
    out = subprocess.run([sys.executable, CLI, "--help"], capture_output=True, text=True, check=True)
    for flag in ("--input", "--input-format", "--json-keys", "--output-prefix", "--tokenizer-type",
                 "--tokenizer-model", "--vocab-file", "--merge-file", "--append-eod", "--split-sentences",
                 "--workers", "--partitions", "--merge", "--on-bad-record", "--max-document-bytes",
                 "--log-interval"):
        assert flag in out.stdout
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import preprocess_data
    finally:
        sys.path.remove(str(REPO / "tools"))
    args = ["--input", small_jsonl, "--output-prefix", str(tmp_path / "cli"), "--tokenizer-model",
            str(tmp_path / "missing.json")]
    assert preprocess_data.main(args) == 2
