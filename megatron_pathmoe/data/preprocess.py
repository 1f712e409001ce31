"""Corpus -> Megatron indexed datasets (``{prefix}_{key}_document.bin/.idx``), and merging them.

The entry points behind ``tools/preprocess_data.py``: ``run_preprocess`` (one pass, see
``pipeline.py``, or ``--partitions`` passes merged in order, see ``partitions.py``) and
``merge_datasets``. Outputs appear only when complete (``outputs.py``): an interrupted or failed
run never leaves a ``.bin``/``.idx`` pair that looks valid.
"""

from __future__ import annotations

import glob
import os
import sys
import time
from typing import Sequence, TextIO

import numpy as np

from megatron_pathmoe.data.encoders import HF_TYPE, TokenizerSpec
from megatron_pathmoe.data.errors import DataError
from megatron_pathmoe.data.indexed import bin_path, check_indexed_dataset, idx_path, token_dtype
from megatron_pathmoe.data.outputs import TempOutputs
from megatron_pathmoe.data.partitions import run_partitions
from megatron_pathmoe.data.pipeline import (
    BLOCK_BYTES, MAX_DOCUMENT_BYTES, POLICIES, PreprocessConfig, RunStats, write_parts,
)
from megatron_pathmoe.data.progress import Progress
from megatron_pathmoe.data.readers import expand_inputs, plan_partitions

__all__ = [
    "BLOCK_BYTES", "MAX_DOCUMENT_BYTES", "POLICIES", "PreprocessConfig", "merge_datasets",
    "output_prefix_for", "preprocess", "run_preprocess", "token_dtype",
]


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron naming: ``{output_prefix}_{key}_document``."""
    return f"{output_prefix}_{key}_document"


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
    outputs = TempOutputs({k: output_prefix_for(cfg.output_prefix, k) for k in cfg.json_keys})
    outputs.prepare()
    groups = plan_partitions(files, cfg.partitions, cfg.input_format)
    progress = Progress(sum(p.nbytes for g in groups for p in g), log, cfg.log_interval)
    try:
        if len(groups) == 1:
            stats = write_parts(groups[0], cfg, opts, encoder, outputs, outputs.files, dtype,
                                progress, cfg.workers)
        else:
            stats = run_partitions(groups, cfg, opts, outputs, dtype, progress)
        _require_documents(cfg, stats)
        outputs.commit()
    except BaseException:
        outputs.discard()
        raise
    finally:
        progress.close()
    return _summary(outputs.finals, stats, dtype, progress.elapsed, len(groups), log)


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
        per_key[key] = {"prefix": prefix, "documents": stats.documents[key],
                        "tokens": stats.tokens[key], "empty_documents": stats.empty[key],
                        "first_empty": stats.first_empty.get(key), "bytes": size}
    total = {f: sum(v[f] for v in per_key.values())
             for f in ("documents", "empty_documents", "tokens", "bytes")}
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
        print(f"done: {total['documents']:,} documents ({total['empty_documents']:,} empty "
              f"skipped{bad}), {total['tokens']:,} tokens, {total['bytes']:,} bytes, dtype "
              f"{summary['dtype']}, {elapsed:.2f} s ({summary['docs_per_s']:,.0f} docs/s, "
              f"{summary['tokens_per_s']:,.0f} tokens/s) "
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
    spec = (tokenizer if isinstance(tokenizer, TokenizerSpec)
            else TokenizerSpec(HF_TYPE, os.fspath(tokenizer)))
    inputs = ([os.fspath(input_path)] if isinstance(input_path, (str, os.PathLike))
              else list(input_path))
    cfg = PreprocessConfig(inputs, output_prefix, spec, json_keys=tuple(json_keys),
                           append_eod=append_eod, workers=workers, log_interval=log_interval,
                           quiet=quiet, **options)
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
        raise DataError(f"--merge: the datasets have different token dtypes "
                        f"({', '.join(dtypes)}): they were made with different tokenizers; merge "
                        "only datasets of one tokenizer")
    start = time.perf_counter()
    outputs = TempOutputs({"merged": output_prefix})
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
               "bytes": out.bin_bytes + out.idx_bytes,
               "elapsed_s": round(time.perf_counter() - start, 3)}
    if not quiet:
        print(f"merged {len(prefixes)} datasets: {out.documents:,} documents, "
              f"{out.token_count:,} tokens, dtype {out.dtype.name} -> {output_prefix}.bin/.idx",
              file=sys.stderr, flush=True)
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
