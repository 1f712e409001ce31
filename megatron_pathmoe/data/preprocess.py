"""Corpus -> Megatron indexed datasets (``{prefix}_{key}_document.bin/.idx``), and merging them.

The pipeline behind ``tools/preprocess_data.py``. The main process reads blocks of raw records
(``readers.py``), a pool of workers parses and tokenizes whole blocks with batched encoding
(``encode.py``), and the main process writes the results in input order (``indexed.py``). At
most ``2 * workers + 1`` blocks are in flight, so memory is bounded whatever the corpus size.
``--partitions N`` runs N such pipelines on contiguous parts of the input and merges their
outputs in order (the bytes do not depend on N or on the number of workers).

Outputs are written under temporary names (``{final}.bin.tmp-PID``) and renamed only when
complete, the ``.idx`` last: an interrupted or failed run never leaves a ``.bin``/``.idx`` pair
that looks valid. Temporaries of runs that were killed are removed by the next run.
"""

from __future__ import annotations

import glob
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from collections import Counter, deque
from contextlib import closing
from dataclasses import dataclass, field
from typing import Iterator, Sequence, TextIO

import numpy as np
from tqdm import tqdm

from megatron_pathmoe.data.encode import EncodedBlock, EncodeOptions, encode_block
from megatron_pathmoe.data.encoders import HF_TYPE, TextEncoder, TokenizerSpec
from megatron_pathmoe.data.errors import DataError
from megatron_pathmoe.data.indexed import IndexWriter, bin_path, check_indexed_dataset, idx_path, token_dtype
from megatron_pathmoe.data.readers import INPUT_FORMATS, Block, Part, expand_inputs, iter_blocks, plan_partitions

__all__ = [
    "PreprocessConfig", "merge_datasets", "output_prefix_for", "preprocess", "run_preprocess", "token_dtype",
]
POLICIES = ("fail", "skip")
BLOCK_BYTES = 256 << 10  # raw input per worker task: ~0.1-0.5 s of tokenization, many tasks per worker
MAX_DOCUMENT_BYTES = 64 << 20
SHOWN_BAD_RECORDS = 5  # skipped records printed with file:line; the rest are only counted


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron naming: ``{output_prefix}_{key}_document``."""
    return f"{output_prefix}_{key}_document"


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
        return EncodeOptions(self.input_format, tuple(self.json_keys), self.append_eod, self.split_sentences,
                             np.dtype(dtype).name, self.max_document_bytes)


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


class Progress:
    """tqdm over input bytes with docs/s and tokens/s; plain lines when stderr is not a terminal."""

    def __init__(self, total_bytes: int, stream: TextIO | None, log_interval: int) -> None:
        self.start = time.perf_counter()
        self.docs = self.tokens = 0
        self.stream, self.log_interval, self.next_log = stream, log_interval, log_interval
        self._last_postfix = 0.0
        self.bar = None
        if stream is not None and stream.isatty():
            self.bar = tqdm(total=total_bytes or None, unit="B", unit_scale=True, unit_divisor=1024,
                            file=stream, dynamic_ncols=True, mininterval=0.5, desc="preprocess")

    @property
    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def rates(self) -> str:
        return f"{self.docs / self.elapsed:,.0f} docs/s, {self.tokens / self.elapsed:,.0f} tokens/s"

    def update(self, docs: int, tokens: int, nbytes: int) -> None:
        self.docs += docs
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(nbytes)
            if time.perf_counter() - self._last_postfix > 0.5:
                self._last_postfix = time.perf_counter()
                self.bar.set_postfix_str(self.rates(), refresh=False)
        elif self.stream is not None and 0 < self.log_interval <= self.docs and self.docs >= self.next_log:
            self.next_log = (self.docs // self.log_interval + 1) * self.log_interval
            print(f"processed {self.docs:,} documents ({self.rates()})", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _SharedProgress:
    """Progress of a partition process: three slots of a shared array read by the parent."""

    def __init__(self, counters, index: int) -> None:
        self.counters, self.base = counters, 3 * index

    def update(self, docs: int, tokens: int, nbytes: int) -> None:
        for offset, value in enumerate((docs, tokens, nbytes)):
            self.counters[self.base + offset] += value


class _Outputs:
    """Temporary files of one run; ``commit()`` renames them to their final names."""

    def __init__(self, finals: dict[str, str], flag: str = "--output-prefix") -> None:
        self.finals, self.flag = finals, flag
        self.tag = f"tmp-{os.getpid()}"
        self.files = {k: self.temp_pair(p, self.tag) for k, p in finals.items()}
        self.extra: list[str] = []

    @staticmethod
    def temp_pair(prefix: str, tag: str) -> tuple[str, str]:
        # The suffix comes after .bin/.idx, so no temporary pair is ever mistaken for a dataset.
        return f"{bin_path(prefix)}.{tag}", f"{idx_path(prefix)}.{tag}"

    def partition_files(self, index: int) -> dict[str, tuple[str, str]]:
        files = {k: self.temp_pair(p, f"{self.tag}-part{index}") for k, p in self.finals.items()}
        self.extra.extend(path for pair in files.values() for path in pair)
        return files

    def prepare(self) -> None:
        """Create the output folder, check it is writable, remove temporaries of dead runs."""
        for prefix in self.finals.values():
            folder = os.path.dirname(os.path.abspath(prefix))
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as err:
                raise self.error(prefix, f"cannot create folder {folder} ({err.strerror})") from None
            if not os.access(folder, os.W_OK | os.X_OK):
                raise self.error(prefix, f"folder {folder} is not writable")
            _remove_stale_temporaries(prefix)

    def error(self, prefix: str, problem: str) -> DataError:
        return DataError(f"{self.flag} {prefix!r}: {problem}; choose a writable location")

    def open_writers(self, files: dict[str, tuple[str, str]], dtype: type[np.number]) -> dict[str, IndexWriter]:
        writers: dict[str, IndexWriter] = {}
        try:
            for key, (bin_file, idx_file) in files.items():
                writers[key] = IndexWriter(bin_file, idx_file, dtype)
        except OSError as err:
            for writer in writers.values():
                writer.close()
            raise self.error(self.finals[key], f"cannot write {err.filename or bin_file} ({err.strerror})") from None
        return writers

    def commit(self) -> None:
        for key, prefix in self.finals.items():
            tmp_bin, tmp_idx = self.files[key]
            _remove([idx_path(prefix)])  # an old .idx must never pair with the new .bin
            os.replace(tmp_bin, bin_path(prefix))
            os.replace(tmp_idx, idx_path(prefix))

    def discard(self) -> None:
        """Best effort: never let cleanup hide the error that caused it."""
        for path in [p for pair in self.files.values() for p in pair] + self.extra:
            try:
                os.remove(path)
            except OSError:
                pass


def _remove(paths: Sequence[str]) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(prefix: str) -> None:
    for ext in (".bin", ".idx"):
        for path in glob.glob(glob.escape(prefix + ext) + ".tmp-*"):
            pid = path.rsplit(".tmp-", 1)[1].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                _remove([path])


# ---------------------------------------------------------------------------------------------
# Encoding: in-process for one worker, else a pool that returns blocks in input order.

_WORKER: tuple[TextEncoder, EncodeOptions] | None = None


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent dies, so a ``kill -9`` of the tool leaves no
    orphaned workers blocked on the task queue."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _init_worker(spec: TokenizerSpec, opts: EncodeOptions) -> None:
    global _WORKER
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the main process
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Pool.terminate(): end quietly, whatever the parent set
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the pool is the parallelism
    _WORKER = (spec.load(), opts)


def _encode_in_worker(block: Block) -> EncodedBlock:
    assert _WORKER is not None
    return encode_block(block, _WORKER[1], _WORKER[0])


def _context() -> multiprocessing.context.BaseContext:
    # fork: workers start at once with the modules already imported
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


def _encoded_blocks(blocks: Iterator[Block], opts: EncodeOptions, spec: TokenizerSpec, encoder: TextEncoder,
                    workers: int) -> Iterator[tuple[Block, EncodedBlock]]:
    if workers <= 1:
        for block in blocks:
            yield block, encode_block(block, opts, encoder)
        return
    with _context().Pool(workers, initializer=_init_worker, initargs=(spec, opts)) as pool:
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


class _Sink:
    """Applies the bad-record policy, writes encoded blocks, counts and reports progress."""

    def __init__(self, writers: dict[str, IndexWriter], policy: str, progress, log: TextIO | None) -> None:
        self.writers, self.policy, self.progress, self.log = writers, policy, progress, log
        self.stats = RunStats()

    def bad(self, where: str, kind: str, message: str) -> None:
        text = f"{where}: {message}"
        if self.policy == "fail":
            raise DataError(f"{text} [--on-bad-record fail; --on-bad-record skip skips and counts such records]")
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


def _run_parts(parts: Sequence[Part], cfg: PreprocessConfig, opts: EncodeOptions, encoder: TextEncoder,
               writers: dict[str, IndexWriter], progress, workers: int, log: TextIO | None) -> RunStats:
    sink = _Sink(writers, cfg.on_bad_record, progress, log)
    blocks = iter_blocks(parts, cfg.input_format, cfg.block_bytes, cfg.max_document_bytes)
    with closing(_encoded_blocks(blocks, opts, cfg.tokenizer, encoder, workers)) as encoded_blocks:
        for block, encoded in encoded_blocks:
            sink.consume(block, encoded)
    return sink.stats


# ---------------------------------------------------------------------------------------------
# Partitions: one process per contiguous group of parts, merged in order by the parent.

def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _partition_main(index: int, parts: list[Part], cfg: PreprocessConfig, opts: EncodeOptions, workers: int,
                    files: dict[str, tuple[str, str]], outputs: _Outputs, dtype, counters, conn) -> None:
    _die_with_parent()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so the pool below is shut down too
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    try:
        writers = outputs.open_writers(files, dtype)
        try:
            log = None if cfg.quiet else sys.stderr
            stats = _run_parts(parts, cfg, opts, cfg.tokenizer.load(), writers, _SharedProgress(counters, index),
                               workers, log)
            for writer in writers.values():
                writer.finalize()
        finally:
            for writer in writers.values():
                writer.close()
        _report(conn, ("ok", stats))
    except DataError as err:
        _report(conn, ("error", str(err)))
    except BaseException as err:  # report anything, the parent decides
        _report(conn, ("error", f"partition {index} failed: {type(err).__name__}: {err}"))
    finally:
        conn.close()


def _report(conn, message: tuple) -> None:
    try:
        conn.send(message)
    except OSError:  # the parent is gone (killed): nobody to tell
        pass


def _run_partitions(groups: list[list[Part]], cfg: PreprocessConfig, opts: EncodeOptions, outputs: _Outputs,
                    dtype, progress: Progress) -> RunStats:
    ctx = _context()
    counters = ctx.Array("d", 3 * len(groups), lock=False)
    workers = max(1, cfg.workers // len(groups))
    part_files = [outputs.partition_files(i) for i in range(len(groups))]
    children = []
    try:
        for i, parts in enumerate(groups):
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_partition_main, name=f"preprocess-partition-{i}",
                               args=(i, parts, cfg, opts, workers, part_files[i], outputs, dtype, counters, send))
            proc.start()
            send.close()
            children.append((proc, recv))
        results = _collect(children, counters, progress)
    finally:
        for proc, _ in children:
            if proc.is_alive():
                proc.terminate()
            proc.join()
    stats = RunStats()
    for result in results:
        stats.merge(result)
    writers = outputs.open_writers(outputs.files, dtype)
    try:
        for key, writer in writers.items():
            for files in part_files:
                writer.add_files(*files[key])
                _remove(files[key])
            writer.finalize()
    finally:
        for writer in writers.values():
            writer.close()
    return stats


def _collect(children: list, counters, progress: Progress) -> list[RunStats]:
    results: dict[int, RunStats] = {}
    seen = [0.0] * len(counters)
    conns = {recv: i for i, (_, recv) in enumerate(children)}
    while len(results) < len(children):
        for recv in multiprocessing.connection.wait(list(conns), timeout=0.25):
            i = conns.pop(recv)
            try:
                status, payload = recv.recv()
            except EOFError:
                raise DataError(f"--partitions: partition {i} died (exit code {children[i][0].exitcode}) "
                                "without a report; rerun with --partitions 1 to see the error") from None
            if status == "error":
                raise DataError(payload)
            results[i] = payload
        now = list(counters)
        progress.update(*(int(sum(now[k::3]) - sum(seen[k::3])) for k in range(3)))
        seen = now
    return [results[i] for i in range(len(children))]


# ---------------------------------------------------------------------------------------------

def run_preprocess(cfg: PreprocessConfig) -> dict:
    """Tokenize ``cfg.inputs`` into one indexed dataset per JSON key; return the summary.

    Summary keys: ``prefixes`` (key -> written prefix), ``documents`` (summed over keys),
    ``empty_documents``, ``bad_records`` (kind -> count, skipped under ``--on-bad-record skip``),
    ``tokens``, ``bytes`` (.bin + .idx), ``dtype``, ``elapsed_s``, ``docs_per_s``,
    ``tokens_per_s``, ``partitions`` and ``per_key``.

    Raises:
        DataError: bad flags, tokenizer or input (naming the flag, or the file and line), in
            which case no output file is left behind.
    """
    cfg.validate()
    encoder = cfg.tokenizer.load()
    files = expand_inputs(cfg.inputs)
    dtype = token_dtype(encoder.vocab_size)
    opts = cfg.encode_options(dtype)
    log = None if cfg.quiet else sys.stderr
    outputs = _Outputs({k: output_prefix_for(cfg.output_prefix, k) for k in cfg.json_keys})
    outputs.prepare()
    groups = plan_partitions(files, cfg.partitions, cfg.input_format)
    progress = Progress(sum(p.nbytes for g in groups for p in g), log, cfg.log_interval)
    try:
        if len(groups) == 1:
            stats = _run_single(groups[0], cfg, opts, encoder, outputs, dtype, progress, log)
        else:
            stats = _run_partitions(groups, cfg, opts, outputs, dtype, progress)
        _require_documents(cfg, stats)
        outputs.commit()
    except BaseException:
        outputs.discard()
        raise
    finally:
        progress.close()
    return _summary(outputs.finals, stats, dtype, progress.elapsed, len(groups), log)


def _run_single(parts: list[Part], cfg: PreprocessConfig, opts: EncodeOptions, encoder: TextEncoder,
                outputs: _Outputs, dtype, progress: Progress, log: TextIO | None) -> RunStats:
    writers = outputs.open_writers(outputs.files, dtype)
    try:
        stats = _run_parts(parts, cfg, opts, encoder, writers, progress, cfg.workers, log)
        for writer in writers.values():
            writer.finalize()
    finally:
        for writer in writers.values():
            writer.close()
    return stats


def _require_documents(cfg: PreprocessConfig, stats: RunStats) -> None:
    for key in cfg.json_keys:
        if stats.documents[key] == 0:
            skipped = sum(stats.bad.values())
            raise DataError(
                f"--input {' '.join(cfg.inputs)}: no documents with text under key {key!r} "
                f"({stats.empty[key]} empty, {skipped} bad records skipped); nothing written"
            )


def _summary(finals: dict[str, str], stats: RunStats, dtype, elapsed: float, partitions: int,
             log: TextIO | None) -> dict:
    per_key = {}
    for key, prefix in finals.items():
        size = os.path.getsize(bin_path(prefix)) + os.path.getsize(idx_path(prefix))
        per_key[key] = {"prefix": prefix, "documents": stats.documents[key], "tokens": stats.tokens[key],
                        "empty_documents": stats.empty[key], "first_empty": stats.first_empty.get(key),
                        "bytes": size}
    total = {f: sum(v[f] for v in per_key.values()) for f in ("documents", "empty_documents", "tokens", "bytes")}
    summary = dict(
        total,
        bad_records=dict(stats.bad),
        skipped_examples=list(stats.examples),
        prefixes={k: v["prefix"] for k, v in per_key.items()},
        dtype=np.dtype(dtype).name,
        elapsed_s=round(elapsed, 3),
        docs_per_s=round(total["documents"] / elapsed, 1),
        tokens_per_s=round(total["tokens"] / elapsed, 1),
        partitions=partitions,
        per_key=per_key,
    )
    if log is not None:
        skipped = sum(stats.bad.values())
        bad = f", {skipped} bad records skipped {dict(stats.bad)}" if skipped else ""
        print(f"done: {total['documents']:,} documents ({total['empty_documents']:,} empty skipped{bad}), "
              f"{total['tokens']:,} tokens, {total['bytes']:,} bytes, dtype {summary['dtype']}, "
              f"{elapsed:.2f} s ({summary['docs_per_s']:,.0f} docs/s, {summary['tokens_per_s']:,.0f} tokens/s) "
              f"-> {', '.join(summary['prefixes'].values())}", file=log, flush=True)
    return summary


def preprocess(
    input_path: str | os.PathLike | Sequence[str],
    output_prefix: str,
    tokenizer: str | os.PathLike | TokenizerSpec,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = True,
    workers: int = 1,
    log_interval: int = 1000,
    quiet: bool = False,
    **options,
) -> dict:
    """Python entry point of tools/preprocess_data.py (see ``run_preprocess`` for the summary).

    ``tokenizer``: a tokenizer.json path or a ``TokenizerSpec``; ``options``: the other
    ``PreprocessConfig`` fields (``input_format``, ``partitions``, ``on_bad_record``, ...).
    """
    spec = tokenizer if isinstance(tokenizer, TokenizerSpec) else TokenizerSpec(HF_TYPE, os.fspath(tokenizer))
    inputs = [os.fspath(input_path)] if isinstance(input_path, (str, os.PathLike)) else list(input_path)
    cfg = PreprocessConfig(inputs, output_prefix, spec, json_keys=tuple(json_keys), append_eod=append_eod,
                           workers=workers, log_interval=log_interval, quiet=quiet, **options)
    return run_preprocess(cfg)


def merge_datasets(inputs: Sequence[str], output_prefix: str, quiet: bool = False) -> dict:
    """Concatenate indexed datasets into ``output_prefix.bin/.idx`` (Megatron's ``add_index``).

    ``inputs``: prefixes, or folders whose ``*.idx``/``*.bin`` pairs are taken in sorted order.
    Every input is validated first; all must have the same token dtype.
    """
    prefixes = _merge_inputs(inputs)
    infos = [check_indexed_dataset(p, "--merge") for p in prefixes]
    dtypes = sorted({i.dtype.name for i in infos})
    if len(dtypes) > 1:
        raise DataError(f"--merge: the datasets have different token dtypes ({', '.join(dtypes)}): they were "
                        "made with different tokenizers; merge only datasets of one tokenizer")
    start = time.perf_counter()
    outputs = _Outputs({"merged": output_prefix})
    outputs.prepare()
    try:
        writers = outputs.open_writers(outputs.files, infos[0].dtype)
        writer = writers["merged"]
        try:
            for prefix in prefixes:
                writer.add_dataset(prefix)
            writer.finalize()
        finally:
            writer.close()
        outputs.commit()
    except BaseException:
        outputs.discard()
        raise
    out = check_indexed_dataset(output_prefix)
    summary = {"prefix": output_prefix, "inputs": prefixes, "documents": out.documents,
               "sequences": out.sequence_count, "tokens": out.token_count, "dtype": out.dtype.name,
               "bytes": out.bin_bytes + out.idx_bytes, "elapsed_s": round(time.perf_counter() - start, 3)}
    if not quiet:
        print(f"merged {len(prefixes)} datasets: {out.documents:,} documents, {out.token_count:,} tokens, "
              f"dtype {out.dtype.name} -> {output_prefix}.bin/.idx", file=sys.stderr, flush=True)
    return summary


def _merge_inputs(inputs: Sequence[str]) -> list[str]:
    prefixes: list[str] = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(p[:-4] for p in glob.glob(os.path.join(glob.escape(item), "*.idx")))
            if not found:
                raise DataError(f"--merge {item!r}: folder holds no .idx files")
            prefixes.extend(found)
        else:
            prefixes.append(item[:-4] if item.endswith((".bin", ".idx")) else item)
    if not prefixes:
        raise DataError("--merge: give at least one dataset prefix or folder")
    return prefixes
