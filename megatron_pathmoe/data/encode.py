"""Worker side of preprocessing: raw records -> checked texts -> token arrays, one block at a time.

A block comes back as one token array, the sequence lengths and sequences per document for
every JSON key, plus the records that were bad (index, kind, message) and the documents that
had no tokens. Documents follow Megatron-LM's ``Encoder.encode``: a JSON value may be a string
or a list of sentence strings; empty sentences are dropped; EOD is appended to the last
sentence of a non-empty document.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from megatron_pathmoe.data.encoders import TextEncoder
from megatron_pathmoe.data.readers import Block, Record

# Rule-based sentence boundary (for --split-sentences): whitespace after . ! or ? (optionally
# followed by a closing quote or bracket) and before an upper-case letter, digit or opening quote.
_NEXT = r"(?=[\"'(\[]?[A-Z0-9])"
_SENTENCE_BREAK = re.compile(rf"(?<=[.!?])\s+{_NEXT}|(?<=[.!?][\"')\]])\s+{_NEXT}")
_HINT_JSON = 'every line of --input must be one JSON object like {"text": "..."}'


@dataclass(frozen=True)
class EncodeOptions:
    """How records become documents (the flags that shape the output)."""

    input_format: str = "jsonl"
    json_keys: tuple[str, ...] = ("text",)
    append_eod: bool = True
    split_sentences: bool = False
    dtype: str = "uint16"
    max_document_bytes: int = 64 << 20


@dataclass
class KeyTokens:
    """Documents of one key: concatenated tokens, every sequence's length, sequences per doc."""

    tokens: np.ndarray
    seq_lengths: np.ndarray
    seqs_per_doc: np.ndarray
    empty: list[int] = field(default_factory=list)  # records whose document had no tokens


@dataclass
class EncodedBlock:
    keys: list[KeyTokens]  # aligned with EncodeOptions.json_keys
    bad: list[tuple[int, str, str]]  # (record index, kind, message)


class BadRecord(Exception):
    """A record that cannot become a document; ``kind`` is the counter it goes to."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def split_sentences(text: str) -> list[str]:
    """Rule-based sentence split (not NLTK punkt): see ``_SENTENCE_BREAK``."""
    return [s for s in _SENTENCE_BREAK.split(text) if s]


def _decode(record: bytes) -> str:
    try:
        text = record.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRecord("invalid UTF-8", f"invalid UTF-8 at byte {err.start} of the record "
                                         f"({err.reason}); re-encode the file as UTF-8") from None
    return text[1:] if text.startswith("\ufeff") else text  # a byte-order mark is not text


def _json_texts(record: bytes, keys: Sequence[str]) -> list[list[str]] | None:
    """Sentences per key of one jsonl line; None for a blank line."""
    text = _decode(record)
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadRecord("malformed JSON", f"malformed JSON ({err.msg} at column {err.colno}); "
                                          f"{_HINT_JSON}: fix or delete that line (plain text "
                                          "needs --input-format text-file or text-paragraph)"
                        ) from None
    if not isinstance(obj, dict):
        raise BadRecord("not a JSON object",
                        f"expected a JSON object, got {type(obj).__name__}; {_HINT_JSON}")
    out = []
    for key in keys:
        if key not in obj:
            shown = ", ".join(sorted(obj)[:8])
            raise BadRecord("missing key", f"key {key!r} missing (keys: {shown}); pass the field "
                                           "holding the text with --json-keys, or fix that line")
        value = obj[key]
        if isinstance(value, str):
            out.append([value])
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            out.append(value)  # pre-split sentences, as Megatron-LM accepts
        else:
            raise BadRecord("not a string", f"key {key!r} holds {type(value).__name__}, expected "
                                            "a string (or a list of sentence strings)")
    return out


def _texts(record: Record, opts: EncodeOptions) -> list[list[str]] | None:
    if isinstance(record, int):
        raise BadRecord("too large", f"document of {record} bytes exceeds --max-document-bytes "
                                     f"{opts.max_document_bytes}; raise the limit or split the "
                                     "document")
    if opts.input_format == "jsonl":
        per_key = _json_texts(record, opts.json_keys)
    else:
        per_key = [[_decode(record)]]
    if per_key is not None and opts.split_sentences:
        per_key = [[s for text in sentences for s in split_sentences(text)]
                   for sentences in per_key]
    return per_key


def _encode_texts(encoder: TextEncoder, texts: list[str]) -> list[list[int] | BadRecord]:
    """Batched; when the batch fails, text by text so only the culprit is reported."""
    try:
        return list(encoder.encode_batch(texts))
    except Exception:
        out: list[list[int] | BadRecord] = []
        for text in texts:
            try:
                out.append(encoder.encode_batch([text])[0])
            except Exception as err:
                reason = " ".join(str(err).split()) or type(err).__name__
                out.append(BadRecord("untokenizable",
                                     f"the tokenizer failed on this text ({reason})"))
        return out


def encode_block(block: Block, opts: EncodeOptions, encoder: TextEncoder) -> EncodedBlock:
    """Parse, check and tokenize every record of ``block``."""
    bad: list[tuple[int, str, str]] = []
    kept: list[int] = []
    per_key: list[list[list[str]]] = [[] for _ in opts.json_keys]
    for i, record in enumerate(block.records):
        try:
            texts = _texts(record, opts)
        except BadRecord as err:
            bad.append((i, err.kind, str(err)))
            continue
        if texts is None:
            continue
        kept.append(i)
        for sentences, key_docs in zip(texts, per_key):
            key_docs.append(sentences)
    encoded = [_encode_docs(encoder, docs) for docs in per_key]
    failed = sorted({j for docs in encoded for j, doc in enumerate(docs)
                     if isinstance(doc, BadRecord)})
    for j in failed:
        err = next(doc[j] for doc in encoded if isinstance(doc[j], BadRecord))
        bad.append((kept[j], err.kind, str(err)))
    bad.sort()
    skip = set(failed)
    eod = encoder.eod if opts.append_eod else None
    keys = [_pack(docs, kept, skip, eod, np.dtype(opts.dtype)) for docs in encoded]
    return EncodedBlock(keys, bad)


def _encode_docs(encoder: TextEncoder, docs: list[list[str]]) -> list[list[list[int]] | BadRecord]:
    """Token ids per sentence per document (or the document's BadRecord)."""
    flat = [s for sentences in docs for s in sentences]
    ids = iter(_encode_texts(encoder, flat) if flat else [])
    out: list[list[list[int]] | BadRecord] = []
    for sentences in docs:
        doc = [next(ids) for _ in sentences]
        err = next((s for s in doc if isinstance(s, BadRecord)), None)
        out.append(err if err is not None else doc)  # type: ignore[arg-type]
    return out


def _pack(docs: list, kept: list[int], skip: set[int], eod: int | None,
          dtype: np.dtype) -> KeyTokens:
    tokens: list[int] = []
    lengths: list[int] = []
    seqs: list[int] = []
    empty: list[int] = []
    for j, sentences in enumerate(docs):
        if j in skip:
            continue
        before = len(lengths)
        for ids in sentences:
            if ids:
                tokens.extend(ids)
                lengths.append(len(ids))
        if len(lengths) == before:
            empty.append(kept[j])
            continue
        if eod is not None:
            tokens.append(eod)
            lengths[-1] += 1
        seqs.append(len(lengths) - before)
    return KeyTokens(np.array(tokens, dtype=dtype), np.array(lengths, dtype=np.int32),
                     np.array(seqs, dtype=np.int64), empty)
