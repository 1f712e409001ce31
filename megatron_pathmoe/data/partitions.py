"""``--partitions N``: N preprocessing passes over contiguous parts of the input, in parallel
processes, whose outputs the parent merges in order (the bytes do not depend on N)."""

from __future__ import annotations

import multiprocessing.connection
import signal

from megatron_pathmoe.data.encode import EncodeOptions
from megatron_pathmoe.data.errors import DataError
from megatron_pathmoe.data.outputs import TempOutputs, remove_files
from megatron_pathmoe.data.pipeline import (
    PreprocessConfig,
    RunStats,
    die_with_parent,
    mp_context,
    write_parts,
)
from megatron_pathmoe.data.progress import Progress, SharedProgress
from megatron_pathmoe.data.readers import Part


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _partition_main(index: int, parts: list[Part], cfg: PreprocessConfig, opts: EncodeOptions,
                    workers: int, files: dict[str, tuple[str, str]], outputs: TempOutputs, dtype,
                    counters, conn) -> None:
    die_with_parent()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so the pool below is shut down too
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    try:
        stats = write_parts(parts, cfg, opts, cfg.tokenizer.load(), outputs, files, dtype,
                            SharedProgress(counters, index), workers)
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


def run_partitions(groups: list[list[Part]], cfg: PreprocessConfig, opts: EncodeOptions,
                   outputs: TempOutputs, dtype, progress: Progress) -> RunStats:
    """Run one process per group of parts, then merge their outputs in order into ``outputs``."""
    ctx = mp_context()
    counters = ctx.Array("d", 3 * len(groups), lock=False)
    workers = max(1, cfg.workers // len(groups))
    part_files = [outputs.partition_files(i) for i in range(len(groups))]
    children = []
    try:
        for i, parts in enumerate(groups):
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_partition_main, name=f"preprocess-partition-{i}",
                               args=(i, parts, cfg, opts, workers, part_files[i], outputs, dtype,
                                     counters, send))
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
                remove_files(files[key])
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
                raise DataError(f"--partitions: partition {i} died (exit code "
                                f"{children[i][0].exitcode}) without a report; rerun with "
                                "--partitions 1 to see the error") from None
            if status == "error":
                raise DataError(payload)
            results[i] = payload
        now = list(counters)
        progress.update(*(int(sum(now[k::3]) - sum(seen[k::3])) for k in range(3)))
        seen = now
    return [results[i] for i in range(len(children))]
