"""Validate an indexed dataset and describe it: counts, document lengths, token range, first
documents.

The engine of ``tools/inspect_data.py``. Everything streams over memory maps in windows, so a
dataset of any size is inspected in bounded memory.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from megatron_pathmoe.data.encoders import TextEncoder, TokenizerSpec
from megatron_pathmoe.data.errors import DataError
from megatron_pathmoe.data.indexed import (
    WINDOW,
    IndexInfo,
    bin_path,
    check_indexed_dataset,
    idx_path,
)

SAMPLE_DOCS = 1_000_000  # document lengths kept for the percentiles


def _document_lengths(info: IndexInfo, index: np.ndarray) -> tuple[dict, np.ndarray]:
    """(min/mean/max over all documents, a sample of at most SAMPLE_DOCS document lengths)."""
    itemsize = info.dtype.itemsize
    n = info.sequence_count
    pointers = np.frombuffer(index, "<i8", n, info.pointers_offset)
    doc_idx = np.frombuffer(index, "<i8", info.document_count, info.doc_idx_offset)
    stride = max(1, info.documents // SAMPLE_DOCS)
    low, high, total, sample = None, 0, 0, []
    for start in range(0, info.documents, WINDOW):
        bounds = doc_idx[start : start + WINDOW + 1]
        lengths = np.diff(_tokens_before(bounds, pointers, info))
        low = int(lengths.min()) if low is None else min(low, int(lengths.min()))
        high, total = max(high, int(lengths.max())), total + int(lengths.sum())
        sample.append(lengths[(-start) % stride :: stride])
    stats = {"min": low or 0, "mean": total / max(1, info.documents), "max": high}
    return stats, np.concatenate(sample) if sample else np.zeros(0, np.int64)


def _tokens_before(sequences: np.ndarray, pointers: np.ndarray, info: IndexInfo) -> np.ndarray:
    """Tokens before each sequence index (pointer / itemsize; index N means all tokens)."""
    if info.sequence_count == 0:
        return np.zeros(len(sequences), dtype=np.int64)
    inside = pointers[np.minimum(sequences, info.sequence_count - 1)] // info.dtype.itemsize
    return np.where(sequences < info.sequence_count, inside, info.token_count)


def _token_range(info: IndexInfo, eod: int | None) -> tuple[int, int, int]:
    """(min id, max id, count of ``eod``) over the whole .bin."""
    tokens = np.memmap(info.bin_file, dtype=info.dtype.newbyteorder("<"), mode="r")
    low, high, eods = None, 0, 0
    for start in range(0, tokens.size, 8 * WINDOW):
        chunk = tokens[start : start + 8 * WINDOW]
        low = int(chunk.min()) if low is None else min(low, int(chunk.min()))
        high = max(high, int(chunk.max()))
        if eod is not None:
            eods += int(np.count_nonzero(chunk == eod))
    del tokens
    return low or 0, high, eods


def _first_documents(info: IndexInfo, index: np.ndarray, count: int) -> list[np.ndarray]:
    tokens = (np.memmap(info.bin_file, dtype=info.dtype.newbyteorder("<"), mode="r")
              if info.token_count else None)
    pointers = np.frombuffer(index, "<i8", info.sequence_count, info.pointers_offset)
    doc_idx = np.frombuffer(index, "<i8", info.document_count, info.doc_idx_offset)
    docs = []
    for d in range(min(count, info.documents)):
        start, end = (int(t) for t in _tokens_before(doc_idx[d : d + 2], pointers, info))
        docs.append(np.array(tokens[start:end]) if tokens is not None else np.zeros(0, info.dtype))
    del tokens
    return docs


def inspect_dataset(prefix: str, tokenizer: TokenizerSpec | TextEncoder | None = None,
                    documents: int = 1) -> dict:
    """Validate ``prefix.bin/.idx`` (see ``check_indexed_dataset``) and describe it.

    With a tokenizer, token ids must be below its vocabulary size, EOD tokens are counted and the
    first ``documents`` documents are detokenized; without one, their ids are returned.

    Raises:
        DataError: the pair is missing, truncated or corrupt, or holds ids outside the vocabulary.
    """
    if prefix.endswith((".bin", ".idx")):
        prefix = prefix[:-4]
    info = check_indexed_dataset(prefix)
    encoder = tokenizer.load() if isinstance(tokenizer, TokenizerSpec) else tokenizer
    index = np.memmap(idx_path(prefix), mode="r")
    lengths, sample = _document_lengths(info, index)
    if sample.size:
        lengths.update(p50=float(np.percentile(sample, 50)), p90=float(np.percentile(sample, 90)))
    low, high, eods = (_token_range(info, encoder.eod if encoder else None)
                       if info.token_count else (0, 0, 0))
    if encoder is not None and high >= encoder.vocab_size:
        raise DataError(f"{bin_path(prefix)}: token id {high} is outside the vocabulary "
                        f"({encoder.vocab_size}) of tokenizer {encoder.name!r}: the dataset was "
                        "made with another tokenizer")
    first = _first_documents(info, index, documents)
    del index
    report = {
        "prefix": prefix, "dtype": info.dtype.name, "documents": info.documents,
        "sequences": info.sequence_count, "tokens": info.token_count, "bin_bytes": info.bin_bytes,
        "idx_bytes": info.idx_bytes, "multimodal": info.multimodal, "document_tokens": lengths,
        "min_token_id": low, "max_token_id": high,
        "first_documents": [d.tolist() for d in first],
    }
    if encoder is not None:
        report.update(tokenizer=encoder.name, vocab_size=encoder.vocab_size, eod=encoder.eod,
                      eod_count=eods, first_texts=[encoder.decode(d.tolist()) for d in first])
    return report


def format_report(report: dict, max_chars: int = 1000) -> str:
    """Human-readable lines for ``inspect_dataset``'s report."""
    lengths = report["document_tokens"]
    lines = [
        f"dataset    {report['prefix']}.bin/.idx: valid",
        f"dtype      {report['dtype']}"
        + ("  (multimodal: sequence modes present)" if report["multimodal"] else ""),
        f"documents  {report['documents']:,}  sequences {report['sequences']:,}  "
        f"tokens {report['tokens']:,}",
        f"bytes      .bin {report['bin_bytes']:,}  .idx {report['idx_bytes']:,}",
        "doc tokens " + "  ".join(f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v:,}"
                                  for k, v in lengths.items()),
        f"token ids  {report['min_token_id']} .. {report['max_token_id']}",
    ]
    if "tokenizer" in report:
        lines.append(f"tokenizer  {report['tokenizer']} (vocab {report['vocab_size']:,}, "
                     f"EOD {report['eod']}: {report['eod_count']:,} in the data)")
        texts: Sequence = report["first_texts"]
    else:
        texts = [f"(ids; pass the tokenizer to detokenize) {ids[:64]}"
                 for ids in report["first_documents"]]
    for i, text in enumerate(texts):
        shown = text if len(text) <= max_chars \
            else text[:max_chars] + f"... [{len(text) - max_chars:,} more chars]"
        tokens = len(report["first_documents"][i])
        lines.append(f"--- document {i} ({tokens:,} tokens) ---\n{shown}")
    return "\n".join(lines)
