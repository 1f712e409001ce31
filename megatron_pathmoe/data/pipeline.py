"""One preprocessing pass: blocks of records -> workers -> index writers, in input order.

The main process reads blocks (``readers.py``), a pool of workers parses and tokenizes whole
blocks with batched encoding (``encode.py``), and the main process writes the results in input
order (``indexed.py``). At most ``2 * workers + 1`` blocks are in flight, so memory is bounded
whatever the corpus size.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections import Counter, deque
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence, TextIO

import numpy as np

from megatron_pathmoe.data.encode import EncodedBlock, EncodeOptions, encode_block
from megatron_pathmoe.data.encoders import TextEncoder, TokenizerSpec
from megatron_pathmoe.data.errors import DataError
from megatron_pathmoe.data.indexed import IndexWriter
from megatron_pathmoe.data.outputs import TempOutputs
from megatron_pathmoe.data.readers import INPUT_FORMATS, Block, Part, iter_blocks

POLICIES = ("fail", "skip")
# Raw input per worker task: ~0.1-0.5 s of tokenization, many tasks per worker.
BLOCK_BYTES = 256 << 10
MAX_DOCUMENT_BYTES = 64 << 20
SHOWN_BAD_RECORDS = 5  # skipped records printed with file:line; the rest are only counted


@dataclass
class PreprocessConfig:
    """Everything one preprocessing run needs (the CLI flags of tools/preprocess_data.py)."""

    inputs: list[str]
    output_prefix: str
    tokenizer: TokenizerSpec
    input_format: str = "jsonl"
    json_keys: tuple[str, ...] = ("text",)
    append_eod: bool = True
    split_sentences: bool = False
    workers: int = 1
    partitions: int = 1
    on_bad_record: str = "fail"
    max_document_bytes: int = MAX_DOCUMENT_BYTES
    block_bytes: int = BLOCK_BYTES
    log_interval: int = 1000
    quiet: bool = False

    def validate(self) -> None:
        """Raise DataError naming the flag of the first bad setting."""
        checks = [
            (bool(self.inputs), "--input: give at least one file, folder or glob"),
            (bool(self.json_keys), "--json-keys: give at least one key"),
            (self.input_format in INPUT_FORMATS,
             f"--input-format {self.input_format!r}: choose one of {', '.join(INPUT_FORMATS)}"),
            (self.input_format == "jsonl" or len(self.json_keys) == 1,
             f"--json-keys: --input-format {self.input_format} has one text per document, so give "
             "one key (it names the output)"),
            (self.workers >= 1, f"--workers must be >= 1, got {self.workers}"),
            (self.partitions >= 1, f"--partitions must be >= 1, got {self.partitions}"),
            (self.on_bad_record in POLICIES,
             f"--on-bad-record {self.on_bad_record!r}: choose one of {', '.join(POLICIES)}"),
            (self.max_document_bytes >= 1, "--max-document-bytes must be >= 1"),
            (self.block_bytes >= 1, "block_bytes must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise DataError(message)

    def encode_options(self, dtype: type[np.number]) -> EncodeOptions:
        return EncodeOptions(self.input_format, tuple(self.json_keys), self.append_eod,
                             self.split_sentences, np.dtype(dtype).name, self.max_document_bytes)


@dataclass
class RunStats:
    """Counts of one run (or one partition), summed with ``merge``."""

    documents: Counter = field(default_factory=Counter)  # per key
    tokens: Counter = field(default_factory=Counter)  # per key
    empty: Counter = field(default_factory=Counter)  # per key
    first_empty: dict = field(default_factory=dict)  # key -> file:line
    bad: Counter = field(default_factory=Counter)  # per kind
    examples: list = field(default_factory=list)  # first skipped records, "file:line: message"

    def merge(self, other: "RunStats") -> None:
        for name in ("documents", "tokens", "empty", "bad"):
            getattr(self, name).update(getattr(other, name))
        for key, where in other.first_empty.items():
            self.first_empty.setdefault(key, where)
        self.examples.extend(other.examples[: SHOWN_BAD_RECORDS - len(self.examples)])


_WORKER: tuple[TextEncoder, EncodeOptions] | None = None


def die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent dies, so a ``kill -9`` of the tool leaves no
    orphaned workers blocked on the task queue."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


# Signals the tool stops on. A signal sent to the process goes to any thread that does not block
# it; if one of Pool's helper threads took a Ctrl-C, the main thread, blocked reading a pipe or
# FIFO, would never see it (a hang). So the pool's threads are started with them blocked.
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Threads and processes started inside inherit SIGINT/SIGTERM blocked (POSIX)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _init_worker(spec: TokenizerSpec, opts: EncodeOptions) -> None:
    global _WORKER
    if hasattr(signal, "pthread_sigmask"):  # forked inside _stop_signals_blocked
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the main process
    # Pool.terminate(): end quietly, whatever the parent set.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the pool parallelises
    _WORKER = (spec.load(), opts)


def _encode_in_worker(block: Block) -> EncodedBlock:
    assert _WORKER is not None
    return encode_block(block, _WORKER[1], _WORKER[0])


def mp_context() -> multiprocessing.context.BaseContext:
    # fork: workers start at once with the modules already imported
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


def encoded_blocks(blocks: Iterator[Block], opts: EncodeOptions, spec: TokenizerSpec,
                   encoder: TextEncoder, workers: int) -> Iterator[tuple[Block, EncodedBlock]]:
    if workers <= 1:
        for block in blocks:
            yield block, encode_block(block, opts, encoder)
        return
    with _stop_signals_blocked():
        pool = mp_context().Pool(workers, initializer=_init_worker, initargs=(spec, opts))
    with pool:
        pending: deque = deque()
        for block in blocks:
            pending.append((block, pool.apply_async(_encode_in_worker, (block,))))
            # Pool.imap would read the whole input ahead; this window bounds memory.
            if len(pending) > 2 * workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()


class Sink:
    """Applies the bad-record policy, writes encoded blocks, counts and reports progress."""

    def __init__(self, writers: dict[str, IndexWriter], policy: str, progress,
                 log: TextIO | None) -> None:
        self.writers, self.policy, self.progress, self.log = writers, policy, progress, log
        self.stats = RunStats()

    def bad(self, where: str, kind: str, message: str) -> None:
        text = f"{where}: {message}"
        if self.policy == "fail":
            raise DataError(f"{text} [--on-bad-record fail; --on-bad-record skip skips and counts "
                            "such records]")
        self.stats.bad[kind] += 1
        if len(self.stats.examples) < SHOWN_BAD_RECORDS:
            self.stats.examples.append(text)
            if self.log is not None:
                print(f"skipped {text}", file=self.log, flush=True)

    def consume(self, block: Block, encoded: EncodedBlock) -> None:
        if block.empty_file:
            self.bad(block.empty_file, "empty file", "empty input file (no records)")
        for i, kind, message in encoded.bad:
            self.bad(block.locate(i), kind, message)
        for (key, writer), out in zip(self.writers.items(), encoded.keys):
            writer.add_documents(out.tokens, out.seq_lengths, out.seqs_per_doc)
            self.stats.documents[key] += len(out.seqs_per_doc)
            self.stats.tokens[key] += out.tokens.size
            self.stats.empty[key] += len(out.empty)
            if out.empty and key not in self.stats.first_empty:
                self.stats.first_empty[key] = block.locate(out.empty[0])
        first = encoded.keys[0]
        self.progress.update(len(first.seqs_per_doc), int(first.tokens.size), block.consumed)


def write_parts(parts: Sequence[Part], cfg: PreprocessConfig, opts: EncodeOptions,
                encoder: TextEncoder, outputs: TempOutputs, files: dict[str, tuple[str, str]],
                dtype, progress, workers: int) -> RunStats:
    """One pass over ``parts`` into the index files ``files`` (key -> (bin, idx)), finalized."""
    log = None if cfg.quiet else sys.stderr
    writers = outputs.open_writers(files, dtype)
    try:
        sink = Sink(writers, cfg.on_bad_record, progress, log)
        blocks = iter_blocks(parts, cfg.input_format, cfg.block_bytes, cfg.max_document_bytes)
        with closing(encoded_blocks(blocks, opts, cfg.tokenizer, encoder, workers)) as stream:
            for block, encoded in stream:
                sink.consume(block, encoded)
        for writer in writers.values():
            writer.finalize()
    finally:
        for writer in writers.values():
            writer.close()
    return sink.stats
