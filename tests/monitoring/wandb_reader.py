"""Reads an offline W&B run file (``run-*.wandb``): a LevelDB-style log of protobuf records
(7-byte ``:W&B`` header, 32 KiB blocks, records split into FULL/FIRST/MIDDLE/LAST chunks),
so the tests can check what the run recorded without a W&B server."""

from __future__ import annotations

import glob
import json
import os
import struct
from typing import Any, Iterator

BLOCK = 32768
FULL, LAST = 1, 4


def records(path: str) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # block trailer too short for a header: padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def offline_run(save_dir: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(config, history rows) of the one offline run under ``save_dir``."""
    (path,) = glob.glob(os.path.join(save_dir, "wandb", "offline-run-*", "run-*.wandb"))
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):  # the config comes with the run or as an update
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update((i.key or "/".join(i.nested_key), json.loads(i.value_json))
                          for i in updates)
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                   for i in record.history.item}
            history.append({**row, "_step": record.history.step.num})
    return config, history
