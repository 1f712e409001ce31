"""The expert-paths file (``<stem>.npy`` + ``<stem>.json``): the most frequent top-1 expert
paths of a model, written by ``python -m megatron_pathmoe.analysis.record_paths`` and read by
``--moe-path-restriction``. A leaf: ``config`` (validation) and ``routing`` (the restriction)
both read it, so it imports nothing of the package.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

PATHS_FORMAT = "megatron-pathmoe-expert-paths"


@dataclass
class PathsFile:
    paths: np.ndarray  # int [K, num_layers], most frequent first
    counts: list[int] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def _stem(path: str) -> str:
    for suffix in (".npy", ".json"):
        if path.endswith(suffix):
            return path[:-len(suffix)]
    return path


def write_paths_file(path: str, paths: np.ndarray, counts: Iterable[int], meta: dict) -> str:
    """Write ``<stem>.npy`` and ``<stem>.json``; returns the .npy path."""
    stem = _stem(path)
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    np.save(f"{stem}.npy", np.asarray(paths, dtype=np.int32))
    record = {"format": PATHS_FORMAT, "counts": [int(c) for c in counts], **meta}
    with open(f"{stem}.json", "w") as f:
        json.dump(record, f, indent=2)
    return f"{stem}.npy"


def read_paths_file(path: str, num_layers: int | None = None,
                    num_experts: int | None = None) -> PathsFile:
    """Read and check a paths file; ``ValueError``/``OSError`` say what is wrong."""
    stem = _stem(path)
    if not os.path.isfile(f"{stem}.npy"):
        raise FileNotFoundError(f"{stem}.npy does not exist; record paths with "
                                "`python -m megatron_pathmoe.analysis.record_paths`")
    paths = np.load(f"{stem}.npy", allow_pickle=False)
    meta: dict = {}
    if os.path.isfile(f"{stem}.json"):
        meta = json.load(open(f"{stem}.json"))
    if paths.ndim != 2 or paths.shape[0] < 1 or not np.issubdtype(paths.dtype, np.integer):
        raise ValueError(f"{stem}.npy must hold an integer array [num_paths >= 1, num_layers], "
                         f"found {paths.dtype} {paths.shape}")
    if num_layers is not None and paths.shape[1] != num_layers:
        raise ValueError(f"{stem}.npy has paths over {paths.shape[1]} layers but the model has "
                         f"--num-layers {num_layers}")
    if num_experts is not None and (paths.min() < 0 or paths.max() >= num_experts):
        raise ValueError(f"{stem}.npy holds expert ids in [{paths.min()}, {paths.max()}], "
                         f"outside [0, --num-experts {num_experts})")
    if meta.get("num_experts") not in (None, num_experts) and num_experts is not None:
        raise ValueError(f"{stem}.json was recorded with {meta['num_experts']} experts, the "
                         f"model has --num-experts {num_experts}")
    return PathsFile(paths=paths.astype(np.int64), counts=list(meta.get("counts", [])),
                     meta=meta)
