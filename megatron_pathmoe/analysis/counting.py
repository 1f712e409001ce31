"""Histograms of small integer codes over millions of tokens, in cache-sized chunks."""

from __future__ import annotations

import numpy as np

CHUNK = 1 << 18  # tokens per chunk: the intp temporaries stay in cache


def histogram(values: np.ndarray, length: int) -> np.ndarray:
    """int64 counts of each value 0..length-1 in ``values`` (any shape, unsigned ints)."""
    flat = values.reshape(-1)
    counts = np.zeros(length, np.int64)
    for start in range(0, flat.size, CHUNK):
        chunk = np.bincount(flat[start:start + CHUNK], minlength=length)
        if chunk.size > length:
            raise ValueError(f"value {chunk.size - 1} is outside 0..{length - 1}")
        counts += chunk
    return counts


def pair_histogram(a: np.ndarray, b: np.ndarray, size: int) -> np.ndarray:
    """int64 [size, size]: how often each pair (a[t], b[t]) occurs, values in 0..size-1."""
    if size <= 16:  # both values fit in one byte: a uint8 code is cheaper to count
        code = (a.astype(np.uint8) << np.uint8(4)) | b.astype(np.uint8)
        return histogram(code, 256).reshape(16, 16)[:size, :size]
    counts = np.zeros(size * size, np.int64)
    for start in range(0, a.size, CHUNK):
        code = a[start:start + CHUNK].astype(np.intp) * size + b[start:start + CHUNK]
        counts += np.bincount(code, minlength=size * size)
    return counts.reshape(size, size)
