"""Streaming input: files -> parts -> blocks of raw records, with their file and line.

The main process only splits input into records (lines, paragraphs or whole files) and groups
them into blocks of about ``block_bytes``; decoding, JSON parsing and tokenization happen in
the workers. No record larger than ``max_document_bytes`` is ever held in memory: it is read
past in small pieces and passed on as its size (an ``int``), which the worker reports.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import IO, Iterator, Sequence

from megatron_pathmoe.data.errors import DataError

INPUT_FORMATS = ("jsonl", "text-file", "text-paragraph")
COMPRESSED_SUFFIXES = (".gz", ".zst")
SKIP_BYTES = 1 << 20  # piece size when reading past an oversized record

Record = bytes | int  # raw bytes, or the size of an oversized record that was not kept


@dataclass(frozen=True)
class Part:
    """A contiguous byte range of one input file (``end=None``: to the end of the file)."""

    path: str
    start: int = 0
    end: int | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the file this part covers (compressed size for compressed files)."""
        return (self.end if self.end is not None else _file_size(self.path)) - self.start


@dataclass
class Block:
    """Records for one worker task, and where each came from.

    ``paths`` holds one path for every record or one per record; ``lines`` holds the first
    record's line (records are consecutive lines) or one line per record. Line numbers count
    from the part's start; ``locate()`` turns them into file line numbers.
    """

    records: list[Record]
    paths: list[str]
    lines: list[int]
    part_start: int = 0
    consumed: int = 0  # input bytes read since the previous block (progress)
    empty_file: str | None = None  # set on the one block emitted for an input with no records

    def origin(self, i: int) -> tuple[str, int]:
        path = self.paths[i] if len(self.paths) > 1 else self.paths[0]
        line = self.lines[i] if len(self.lines) > 1 else self.lines[0] + i
        return path, line

    def locate(self, i: int) -> str:
        """``file:line`` of record ``i``."""
        path, line = self.origin(i)
        if self.part_start:
            line += lines_before(path, self.part_start)
        return f"{path}:{line}"


def _file_size(path: str) -> int:
    return os.path.getsize(path) if os.path.isfile(path) else 0


@lru_cache(maxsize=64)
def lines_before(path: str, offset: int) -> int:
    """Newlines in the first ``offset`` bytes of an uncompressed file (for messages only)."""
    count, left = 0, offset
    with open(path, "rb") as f:
        while left > 0 and (piece := f.read(min(SKIP_BYTES, left))):
            count += piece.count(b"\n")
            left -= len(piece)
    return count


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """``--input`` values -> files: folders are walked (sorted), glob patterns expanded.

    Raises:
        DataError: an input matches nothing.
    """
    files: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(root, name) for root, _, names in os.walk(item) for name in names
                if not name.startswith(".")
            )
        elif os.path.exists(item):  # a regular file, or a named pipe / device
            found = [item]
        else:
            found = sorted(p for p in glob.glob(item, recursive=True) if not os.path.isdir(p))
        if not found:
            raise DataError(f"--input {item!r}: no such file, folder or glob match")
        files.extend(found)
    return files


def _splittable(path: str, input_format: str) -> bool:
    # Only jsonl can start a part at any line; paragraphs and whole files cannot be cut.
    return (input_format == "jsonl" and os.path.isfile(path)
            and not path.endswith(COMPRESSED_SUFFIXES))


def _next_line_start(path: str, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        f.readline()
        return f.tell()


def _split_file(path: str, pieces: int) -> list[Part]:
    size = _file_size(path)
    cuts = sorted({_next_line_start(path, size * k // pieces) for k in range(1, pieces)} - {size})
    bounds = [0] + [c for c in cuts if 0 < c < size] + [size]
    return [Part(path, a, None if b == size else b) for a, b in zip(bounds, bounds[1:]) if b > a]


def plan_partitions(files: Sequence[str], partitions: int, input_format: str) -> list[list[Part]]:
    """Cut the inputs into at most ``partitions`` contiguous groups of parts of similar size.

    Uncompressed jsonl files are cut at line starts; other files stay whole, so fewer groups
    than asked come back when there are fewer pieces than partitions.
    """
    total = sum(_file_size(f) for f in files)
    target = max(1, total // max(1, partitions))
    parts: list[Part] = []
    for path in files:
        splittable = partitions > 1 and _splittable(path, input_format)
        pieces = -(-_file_size(path) // target) if splittable else 1
        parts.extend(_split_file(path, pieces) if pieces > 1 else [Part(path)])
    groups: list[list[Part]] = [[] for _ in range(partitions)]
    done = 0
    for part in parts:  # by where the part's middle falls, so contiguous and balanced
        group = min(partitions - 1, (2 * done + part.nbytes) * partitions // max(1, 2 * total))
        groups[group].append(part)
        done += part.nbytes
    return [g for g in groups if g]


class _Source:
    """An open part: ``stream`` yields decompressed bytes; ``position()`` counts input bytes."""

    def __init__(self, part: Part, raw: IO[bytes], stream: IO[bytes]) -> None:
        self.part, self._raw, self.stream = part, raw, stream
        self._last = part.start

    def consumed(self) -> int:
        """Input bytes read since the previous call (0 for pipes: their size is unknown anyway)."""
        if not self._raw.seekable():
            return 0
        now = self._raw.tell()
        delta, self._last = now - self._last, now
        return delta

    def lines(self, limit: int) -> Iterator[Record]:
        """Lines (with their newline) up to ``limit`` bytes of content; longer ones as their
        size."""
        readline, end = self.stream.readline, self.part.end
        while end is None or self.stream.tell() < end:
            line = readline(limit + 1)
            if not line:
                return
            if len(line) > limit and not line.endswith(b"\n"):
                yield len(line) + self._skip_line()
            else:
                yield line

    def _skip_line(self) -> int:
        skipped = 0
        while piece := self.stream.readline(SKIP_BYTES):
            skipped += len(piece)
            if piece.endswith(b"\n"):
                break
        return skipped

    def read_all(self, limit: int) -> Record:
        data = self.stream.read(limit + 1)
        if len(data) <= limit:
            return data
        size = len(data)
        while piece := self.stream.read(SKIP_BYTES):
            size += len(piece)
        return size


def _read_errors() -> tuple[type[BaseException], ...]:
    try:
        from zstandard import ZstdError
    except ImportError:
        return (OSError, EOFError)
    return (OSError, EOFError, ZstdError)


@contextmanager
def open_part(part: Part) -> Iterator[_Source]:
    """Open a part, decompressing ``.gz``/``.zst``; read errors become DataError naming the file."""
    try:
        raw = open(part.path, "rb")
    except OSError as err:
        raise DataError(f"--input {part.path!r}: cannot open ({err.strerror})") from None
    with raw:
        if part.start:
            raw.seek(part.start)
        try:
            yield _Source(part, raw, _decompressed(part.path, raw))
        except _read_errors() as err:
            raise DataError(f"--input {part.path!r}: read failed ({err}); is the file truncated "
                            "or not what its suffix says?") from None


def _decompressed(path: str, raw: IO[bytes]) -> IO[bytes]:
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if path.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"--input {path!r}: reading .zst needs the zstandard package "
                            "(pip install zstandard)") from None
        return io.BufferedReader(
            zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
    return raw


def iter_blocks(parts: Sequence[Part], input_format: str, block_bytes: int,
                max_document_bytes: int) -> Iterator[Block]:
    """Blocks of records from ``parts`` in input order."""
    reader = {"jsonl": _line_blocks, "text-paragraph": _paragraph_blocks,
              "text-file": _file_blocks}[input_format]
    return reader(parts, block_bytes, max_document_bytes)


def _size(record: Record) -> int:
    return record if isinstance(record, int) else len(record)


def _line_blocks(parts: Sequence[Part], block_bytes: int, limit: int) -> Iterator[Block]:
    for part in parts:
        with open_part(part) as src:
            records: list[Record] = []
            first, size, content = 1, 0, False
            for number, line in enumerate(src.lines(limit), start=1):
                records.append(line)
                size += _size(line)
                content = content or isinstance(line, int) or not line.isspace()
                if size >= block_bytes:
                    yield Block(records, [part.path], [first], part.start, src.consumed())
                    records, first, size = [], number + 1, 0
            if records or not content:
                yield Block(records, [part.path], [first], part.start, src.consumed(),
                            empty_file=_empty_file(part, content))


def _paragraph_blocks(parts: Sequence[Part], block_bytes: int, limit: int) -> Iterator[Block]:
    """Paragraphs separated by blank lines; each paragraph's trailing newline is dropped."""
    for part in parts:
        with open_part(part) as src:
            records: list[Record] = []
            lines: list[int] = []
            size, seen = 0, False
            for start, paragraph in _paragraphs(src, limit):
                records.append(paragraph)
                lines.append(start)
                size += _size(paragraph)
                seen = True
                if size >= block_bytes:
                    yield Block(records, [part.path], lines, part.start, src.consumed())
                    records, lines, size = [], [], 0
            if records or not seen:
                yield Block(records, [part.path], lines or [1], part.start, src.consumed(),
                            empty_file=_empty_file(part, seen))


def _empty_file(part: Part, seen: bool) -> str | None:
    # Only a whole file can be called empty; a part of a file with only blank lines is not.
    return part.path if not seen and part.start == 0 and part.end is None else None


def _paragraphs(src: _Source, limit: int) -> Iterator[tuple[int, Record]]:
    pieces: list[bytes] = []
    start, size = 0, 0
    for number, line in enumerate(src.lines(limit), start=1):
        if isinstance(line, bytes) and line.isspace():
            if start:
                yield start, size if size > limit else b"".join(pieces).rstrip(b"\r\n")
            pieces, start, size = [], 0, 0
            continue
        start = start or number
        size += _size(line)
        if size <= limit:
            pieces.append(line)  # type: ignore[arg-type]  # an int line always exceeds the limit
        else:
            pieces = []
    if start:
        yield start, size if size > limit else b"".join(pieces).rstrip(b"\r\n")


def _file_blocks(parts: Sequence[Part], block_bytes: int, limit: int) -> Iterator[Block]:
    """One document per file; small files are batched into one block."""
    records: list[Record] = []
    paths: list[str] = []
    size, consumed = 0, 0
    for part in parts:
        with open_part(part) as src:
            records.append(src.read_all(limit))
            paths.append(part.path)
            size += _size(records[-1])
            consumed += src.consumed()
        if size >= block_bytes:
            yield Block(records, paths, [1] * len(records), 0, consumed)
            records, paths, size, consumed = [], [], 0, 0
    if records:
        yield Block(records, paths, [1] * len(records), 0, consumed)
