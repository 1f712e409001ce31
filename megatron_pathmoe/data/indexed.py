"""Megatron indexed datasets (``.bin``/``.idx``): a streaming writer and a full validator.

Format (megatron/core/datasets/indexed_dataset.py), little-endian, no padding. ``.idx``: magic
``MMIDIDX\\x00\\x00``; version ``<Q`` = 1; dtype code ``<B``; sequence count N ``<Q``; document
count D ``<Q``; int32[N] sequence lengths; int64[N] byte pointers into ``.bin`` (exclusive
cumsum of length * itemsize); int64[D] document indices (0, then one past the last sequence of
each document); int8[N] sequence modes for multimodal datasets only. ``.bin``: the raw tokens.

``IndexWriter`` writes the same bytes as megatron-core's ``IndexedDatasetBuilder`` (tested),
but keeps the sequence lengths and document boundaries in unlinked scratch files instead of
Python lists, so its memory does not grow with the corpus, and computes pointers with numpy.
Nothing here imports megatron-core or torch (tools start in a fraction of a second).
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, replace
from typing import IO, Iterator

import numpy as np

from megatron_pathmoe.data.errors import DataError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
DTYPES: dict[int, type[np.number]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
    8: np.uint16,
}
CODES = {np.dtype(t): code for code, t in DTYPES.items()}
WINDOW = 1 << 22  # entries per numpy window when streaming index arrays (32 MiB of int64)
COPY_BYTES = 16 << 20


def token_dtype(vocab_size: int) -> type[np.number]:
    """Megatron's rule (``DType.optimal_dtype``): uint16 while every id fits, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def _copy_stream(src: IO[bytes], dst: IO[bytes]) -> None:
    shutil.copyfileobj(src, dst, COPY_BYTES)


class IndexWriter:
    """Streams one indexed dataset to ``bin_file`` and, on ``finalize()``, ``idx_file``.

    Args:
        bin_file, idx_file: output paths (the caller picks temporary names and renames them).
        dtype: token dtype of the ``.bin``.
    """

    def __init__(self, bin_file: str, idx_file: str, dtype: type[np.number]) -> None:
        self.dtype = np.dtype(dtype)
        self.idx_file = idx_file
        self.sequences = 0
        self.documents = 0
        self.tokens = 0
        scratch_dir = os.path.dirname(os.path.abspath(idx_file))
        self._bin = open(bin_file, "wb")
        # Unlinked at creation: nothing to clean up, whatever happens to this process.
        self._lengths = tempfile.TemporaryFile(dir=scratch_dir)
        self._doc_ends = tempfile.TemporaryFile(dir=scratch_dir)

    def add_documents(self, tokens: np.ndarray, seq_lengths: np.ndarray,
                      seqs_per_doc: np.ndarray) -> None:
        """Append documents: their concatenated ``tokens``, the length of every sequence, and how
        many sequences each document has (1 per document unless sentences were split)."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        self._bin.write(memoryview(tokens).cast("B"))
        self._lengths.write(np.asarray(seq_lengths, dtype="<i4").tobytes())
        ends = self.sequences + np.cumsum(seqs_per_doc, dtype=np.int64)
        self._doc_ends.write(ends.astype("<i8", copy=False).tobytes())
        self.sequences += len(seq_lengths)
        self.documents += len(seqs_per_doc)
        self.tokens += tokens.size

    def add_dataset(self, prefix: str) -> None:
        """Append a whole indexed dataset (megatron's ``add_index``); its dtype must match."""
        self.add_files(bin_path(prefix), idx_path(prefix))

    def add_files(self, bin_file: str, idx_file: str) -> None:
        """``add_dataset`` for a pair under any names (e.g. the temporaries of a partition)."""
        info = check_indexed_files(bin_file, idx_file)
        if info.dtype != self.dtype:
            raise DataError(f"{idx_file}: token dtype {info.dtype.name} differs from "
                            f"{self.dtype.name} of the datasets before it; merge only datasets "
                            "made with the same tokenizer")
        index = np.memmap(idx_file, mode="r")
        for lengths in _windows(index, np.int32, info.lengths_offset, info.sequence_count):
            self._lengths.write(lengths.tobytes())
        for ends in _windows(index, np.int64, info.doc_idx_offset + 8, info.document_count - 1):
            self._doc_ends.write((ends + self.sequences).astype("<i8").tobytes())
        del index
        with open(bin_file, "rb") as src:
            _copy_stream(src, self._bin)
        self.sequences += info.sequence_count
        self.documents += info.document_count - 1
        self.tokens += info.token_count

    def finalize(self) -> None:
        """Close the ``.bin`` and write the ``.idx``."""
        self._bin.close()
        with open(self.idx_file, "wb") as out:
            code = CODES[self.dtype]
            out.write(HEADER.pack(INDEX_MAGIC, INDEX_VERSION, code, self.sequences,
                                  self.documents + 1))
            self._lengths.seek(0)
            _copy_stream(self._lengths, out)
            self._write_pointers(out)
            out.write(np.zeros(1, dtype="<i8").tobytes())
            self._doc_ends.seek(0)
            _copy_stream(self._doc_ends, out)
        self.close()

    def _write_pointers(self, out: IO[bytes]) -> None:
        self._lengths.seek(0)
        offset = 0
        while chunk := self._lengths.read(4 * WINDOW):
            nbytes = np.frombuffer(chunk, dtype="<i4").astype(np.int64) * self.dtype.itemsize
            ends = offset + np.cumsum(nbytes)
            out.write((ends - nbytes).astype("<i8", copy=False).tobytes())
            offset = int(ends[-1])

    def close(self) -> None:
        """Release every file (the outputs stay where they are; callers remove temporaries)."""
        for f in (self._bin, self._lengths, self._doc_ends):
            f.close()


def _windows(buffer: np.ndarray, dtype: type, offset: int, count: int) -> Iterator[np.ndarray]:
    itemsize = np.dtype(dtype).itemsize
    for start in range(0, count, WINDOW):
        n = min(WINDOW, count - start)
        yield np.frombuffer(buffer, dtype=np.dtype(dtype).newbyteorder("<"), count=n,
                            offset=offset + start * itemsize)


@dataclass(frozen=True)
class IndexInfo:
    """What ``check_indexed_files`` found in a valid pair."""

    bin_file: str
    idx_file: str
    dtype: np.dtype
    sequence_count: int
    document_count: int  # entries of the document index = documents + 1
    token_count: int
    bin_bytes: int
    idx_bytes: int
    multimodal: bool

    @property
    def documents(self) -> int:
        return self.document_count - 1

    @property
    def lengths_offset(self) -> int:
        return HEADER.size

    @property
    def pointers_offset(self) -> int:
        return HEADER.size + 4 * self.sequence_count

    @property
    def doc_idx_offset(self) -> int:
        return HEADER.size + 12 * self.sequence_count


class _Checker:
    """Builds DataErrors of one line naming the flag, the file and the fix."""

    def __init__(self, flag: str | None, prefix: str | None) -> None:
        self.lead = f"{flag} {prefix!r}: " if flag else ""

    def fail(self, path: str, problem: str) -> DataError:
        return DataError(
            f"{self.lead}{path} is truncated or corrupt ({problem}); regenerate it with "
            "tools/preprocess_data.py, or check it with tools/inspect_data.py"
        )


def check_indexed_dataset(prefix: str, flag: str | None = None) -> IndexInfo:
    """Validate ``prefix.bin``/``prefix.idx`` completely and describe them.

    Checks that both exist, the magic, version and dtype code, that the .idx size matches its
    counts, that sequence lengths are non-negative and every pointer is the previous one plus
    the previous length (so pointers are monotone and the sequences tile the .bin exactly), that
    document indices start at 0, never decrease and end at the sequence count, and that the .bin
    holds exactly the indexed tokens. Memory stays bounded (windows of a memory map).

    Raises:
        DataError: one line naming ``flag`` (when given), the file and what is wrong.
    """
    hint = ""
    if prefix.endswith((".bin", ".idx")):
        hint = f" (give the prefix without the extension: {prefix[:-4]!r})"
    lead = f"{flag} {prefix!r}" if flag else repr(prefix)
    for path in (bin_path(prefix), idx_path(prefix)):
        if not os.path.isfile(path):
            raise DataError(f"{lead}: missing {path}{hint}; create the dataset with "
                            "tools/preprocess_data.py (it writes "
                            "{output-prefix}_text_document.bin/.idx)")
    return check_indexed_files(bin_path(prefix), idx_path(prefix), _Checker(flag, prefix))


def check_indexed_files(bin_file: str, idx_file: str, check: _Checker | None = None) -> IndexInfo:
    """``check_indexed_dataset`` for a pair of files under any names."""
    check = check or _Checker(None, None)
    info = _read_header(check, idx_file, bin_file)
    info = replace(info, token_count=_check_arrays(check, info))
    if info.bin_bytes != info.token_count * info.dtype.itemsize:
        raise check.fail(bin_file, f"{info.bin_bytes} bytes, but the index describes "
                                   f"{info.token_count} {info.dtype.name} tokens = "
                                   f"{info.token_count * info.dtype.itemsize} bytes")
    return info


def _read_header(check: _Checker, idx: str, binf: str) -> IndexInfo:
    idx_bytes = os.path.getsize(idx)
    with open(idx, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise check.fail(idx, f"{idx_bytes} bytes, shorter than the {HEADER.size}-byte header")
    magic, version, code, n, d = HEADER.unpack(raw)
    if magic != INDEX_MAGIC:
        raise check.fail(idx, f"bad magic {magic!r}, expected {INDEX_MAGIC!r}: not a Megatron .idx")
    if version != INDEX_VERSION:
        raise check.fail(idx, f"version {version}, expected {INDEX_VERSION}")
    if code not in DTYPES:
        raise check.fail(idx, f"unknown dtype code {code}")
    plain = HEADER.size + 12 * n + 8 * d
    if idx_bytes not in (plain, plain + n) or d < 1:
        raise check.fail(idx, f"{idx_bytes} bytes, but its header announces {n} sequences and {d} "
                              f"document entries = {plain} bytes")
    return IndexInfo(binf, idx, np.dtype(DTYPES[code]), n, d, 0, os.path.getsize(binf), idx_bytes,
                     multimodal=idx_bytes == plain + n and n > 0)


def _check_arrays(check: _Checker, info: IndexInfo) -> int:
    """Check lengths, pointers and document indices; return the number of tokens."""
    idx = info.idx_file
    index = np.memmap(idx, mode="r")
    itemsize = info.dtype.itemsize
    expected_ptr = 0
    lengths = _windows(index, np.int32, info.lengths_offset, info.sequence_count)
    pointers = _windows(index, np.int64, info.pointers_offset, info.sequence_count)
    for start, (lens, ptrs) in zip(range(0, info.sequence_count, WINDOW), zip(lengths, pointers)):
        if (lens < 0).any():
            bad = start + int(np.argmax(lens < 0))
            raise check.fail(idx, f"sequence {bad} has negative length {int(lens[bad - start])}")
        want = expected_ptr + np.concatenate([[0],
                                              np.cumsum(lens[:-1].astype(np.int64) * itemsize)])
        if not np.array_equal(ptrs, want):
            bad = int(np.argmax(ptrs != want))
            raise check.fail(idx, f"pointer of sequence {start + bad} is {int(ptrs[bad])}, "
                                  f"expected {int(want[bad])} (previous pointer + length x "
                                  f"{itemsize} bytes)")
        expected_ptr = int(want[-1]) + int(lens[-1]) * itemsize
    previous = 0
    doc_windows = _windows(index, np.int64, info.doc_idx_offset, info.document_count)
    for start, docs in zip(range(0, info.document_count, WINDOW), doc_windows):
        if start == 0 and docs[0] != 0:
            raise check.fail(idx, f"document index starts at {int(docs[0])}, expected 0")
        steps = np.diff(docs, prepend=previous)
        if (steps < 0).any():
            bad = start + int(np.argmax(steps < 0))
            raise check.fail(idx, f"document index decreases at entry {bad}")
        previous = int(docs[-1])
    if previous != info.sequence_count:
        raise check.fail(idx, f"document index ends at {previous}, expected the sequence count "
                              f"{info.sequence_count}")
    del index
    return expected_ptr // itemsize
