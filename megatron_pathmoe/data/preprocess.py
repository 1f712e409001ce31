"""jsonl(.gz) -> Megatron indexed dataset (``{prefix}_{key}_document.bin/.idx``).

The input is streamed and at most a few chunks are in flight, so memory stays bounded whatever
the input size. Outputs are written under temporary names and renamed only on success.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from contextlib import ExitStack, closing
from typing import IO, Iterator, Sequence, TextIO

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_pathmoe.data.errors import DataError
from megatron_pathmoe.data.tokenizer import PathMoETokenizer, load_tokenizer

CHUNK_DOCS = 32  # documents per worker task: large enough to amortise pickling
_worker_tokenizer: PathMoETokenizer | None = None


def token_dtype(vocab_size: int) -> type[np.number]:
    """Megatron's rule: uint16 while every id fits, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron naming: ``{output_prefix}_{key}_document``."""
    return f"{output_prefix}_{key}_document"


def _open_text(path: str) -> IO[str]:
    if not os.path.isfile(path):
        raise DataError(f"--input {path!r}: no such file; pass a .jsonl or .jsonl.gz file")
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def _parse_line(path: str, line_no: int, line: str, keys: Sequence[str]) -> list[str]:
    where = f"{path}:{line_no}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{where}: malformed JSON ({err.msg} at column {err.colno}); every line of --input "
            'must be one JSON object like {"text": "..."}: fix or delete that line'
        ) from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}; fix that line")
    texts = []
    for key in keys:
        if key not in record:
            raise DataError(
                f"{where}: key {key!r} missing (keys: {sorted(record)}); pass the field holding "
                "the text with --json-keys, or fix that line"
            )
        if not isinstance(record[key], str):
            raise DataError(f"{where}: key {key!r} is {type(record[key]).__name__}, not a string")
        texts.append(record[key])
    return texts


def iter_chunks(path: str, keys: Sequence[str], chunk_docs: int = CHUNK_DOCS) -> Iterator[list[list[str]]]:
    """Yield chunks of documents, each document a list of texts (one per key). Blank lines skip."""
    chunk: list[list[str]] = []
    with _open_text(path) as stream:
        try:
            for line_no, line in enumerate(stream, start=1):
                if line.strip():
                    chunk.append(_parse_line(path, line_no, line, keys))
                if len(chunk) == chunk_docs:
                    yield chunk
                    chunk = []
        except UnicodeDecodeError as err:
            raise DataError(
                f"--input {path!r}: not UTF-8 text ({err.reason}); re-encode it as UTF-8"
            ) from None
    if chunk:
        yield chunk


def _encode_chunk(
    tokenizer: PathMoETokenizer, chunk: list[list[str]], append_eod: bool, dtype: type
) -> list[list[np.ndarray]]:
    """Per key, per document token arrays; empty documents stay empty (EOD is not added)."""
    out = []
    for texts in zip(*chunk):
        docs = []
        for ids in tokenizer.encode_batch(texts):
            if ids and append_eod:
                ids.append(tokenizer.eod)
            docs.append(np.asarray(ids, dtype=dtype))
        out.append(docs)
    return out


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    # One core per worker: parallelism comes from the pool, not from the tokenizer's threads.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _worker_encode(args: tuple[list[list[str]], bool, type]) -> list[list[np.ndarray]]:
    chunk, append_eod, dtype = args
    assert _worker_tokenizer is not None
    return _encode_chunk(_worker_tokenizer, chunk, append_eod, dtype)


def _encoded_chunks(
    chunks: Iterator[list[list[str]]],
    tokenizer: PathMoETokenizer,
    append_eod: bool,
    dtype: type,
    workers: int,
) -> Iterator[list[list[np.ndarray]]]:
    """Encode chunks in input order, in-process or over a bounded window of pool tasks."""
    if workers <= 1:
        for chunk in chunks:
            yield _encode_chunk(tokenizer, chunk, append_eod, dtype)
        return
    # fork: workers inherit the imported modules (spawn would re-import megatron-core, ~8 s each)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer.path,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_worker_encode, ((chunk, append_eod, dtype),)))
            # Pool.imap would read the whole input ahead; this window keeps memory bounded.
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _Progress:
    def __init__(self, log_interval: int, stream: TextIO | None) -> None:
        self.start = time.perf_counter()
        self.log_interval, self.stream = log_interval, stream
        self.docs = self.tokens = 0
        self.next_log = log_interval

    def update(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        if self.stream is None or self.log_interval <= 0 or self.docs < self.next_log:
            return
        self.next_log += self.log_interval
        elapsed = max(self.elapsed, 1e-9)
        print(
            f"processed {self.docs} documents ({self.docs / elapsed:.0f} docs/s, "
            f"{self.tokens / elapsed:.0f} tokens/s)",
            file=self.stream,
            flush=True,
        )

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _remove(paths: Sequence[str]) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def preprocess(
    input_path: str,
    output_prefix: str,
    tokenizer_path: str,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = True,
    workers: int = 1,
    log_interval: int = 1000,
    quiet: bool = False,
) -> dict:
    """Tokenize ``input_path`` into one indexed dataset per JSON key.

    Returns a summary dict: ``prefixes`` (key -> written prefix), ``documents`` (written, summed
    over keys), ``empty_documents`` (skipped), ``tokens``, ``bytes`` (.bin + .idx), ``dtype``,
    ``elapsed_s``, ``docs_per_s``, ``tokens_per_s`` and ``per_key``. Progress (every
    ``log_interval`` documents) and the summary line go to stderr unless ``quiet``. Raises DataError
    on bad input, leaving no output files behind.
    """
    log_stream = None if quiet else sys.stderr
    keys = list(json_keys)
    if not keys:
        raise DataError("--json-keys: give at least one key")
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    tokenizer = load_tokenizer(tokenizer_path)
    dtype = token_dtype(tokenizer.vocab_size)
    final = {k: output_prefix_for(output_prefix, k) for k in keys}
    tmp_tag = f".tmp-{os.getpid()}"
    tmp = {k: (final[k] + ".bin" + tmp_tag, final[k] + ".idx" + tmp_tag) for k in keys}
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    counts = {k: {"documents": 0, "empty_documents": 0, "tokens": 0} for k in keys}
    progress = _Progress(log_interval, log_stream)
    tmp_files = [p for pair in tmp.values() for p in pair]
    try:
        with ExitStack() as stack:
            builders = {}
            for k in keys:
                builders[k] = IndexedDatasetBuilder(tmp[k][0], dtype=dtype)
                stack.callback(builders[k].data_file.close)
            chunks = iter_chunks(input_path, keys)
            # closing(): on error, stop the pool now rather than at garbage collection
            encoded_chunks = stack.enter_context(
                closing(_encoded_chunks(chunks, tokenizer, append_eod, dtype, workers))
            )
            for encoded in encoded_chunks:
                for k, docs in zip(keys, encoded):
                    _add_documents(builders[k], docs, counts[k])
                progress.update(len(encoded[0]), sum(int(d.size) for d in encoded[0]))
            for k in keys:
                builders[k].finalize(tmp[k][1])
        for k in keys:
            os.replace(tmp[k][0], final[k] + ".bin")
            os.replace(tmp[k][1], final[k] + ".idx")
    except BaseException:
        _remove(tmp_files)
        raise
    return _summary(final, counts, dtype, progress.elapsed, log_stream)


def _add_documents(builder: IndexedDatasetBuilder, docs: list[np.ndarray], counts: dict) -> None:
    for doc in docs:
        if doc.size == 0:
            counts["empty_documents"] += 1
            continue
        builder.add_document(doc, [doc.size])
        counts["documents"] += 1
        counts["tokens"] += int(doc.size)


def _summary(final: dict, counts: dict, dtype: type, elapsed: float, stream: TextIO | None) -> dict:
    per_key = {}
    for k, prefix in final.items():
        size = os.path.getsize(prefix + ".bin") + os.path.getsize(prefix + ".idx")
        per_key[k] = dict(counts[k], prefix=prefix, bytes=size)
    fields = ("documents", "empty_documents", "tokens", "bytes")
    total = {f: sum(v[f] for v in per_key.values()) for f in fields}
    elapsed = max(elapsed, 1e-9)
    summary = dict(
        total,
        prefixes={k: v["prefix"] for k, v in per_key.items()},
        dtype=np.dtype(dtype).name,
        elapsed_s=round(elapsed, 3),
        docs_per_s=round(total["documents"] / elapsed, 1),
        tokens_per_s=round(total["tokens"] / elapsed, 1),
        per_key=per_key,
    )
    if stream is not None:
        print(
            f"done: {total['documents']} documents ({total['empty_documents']} empty skipped), "
            f"{total['tokens']} tokens, {total['bytes']} bytes, dtype {summary['dtype']}, "
            f"{elapsed:.2f} s -> {', '.join(summary['prefixes'].values())}",
            file=stream,
            flush=True,
        )
    return summary
