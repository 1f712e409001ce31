"""The on-disk format of recorded expert paths; the only module that reads or writes it.

A recording is a directory::

    meta.json       format, version, shapes, layer numbers, "complete", free-form "info"
    experts.npy     uint8   [L, k, N]  expert ids; rank 0 is the highest router probability
    probs.npy       float16 [L, k, N]  the router probabilities of those experts
    tokens.npy      int32   [N]        input token id of each routed position
    positions.npy   int32   [N]        position of the token in its sequence (0..S-1)

``L`` counts MoE layers in increasing global layer number (``meta["layer_numbers"]``, 1-based
as megatron numbers them), ``k`` is the router top-k and ``N`` the number of tokens. The layout
is layer-major and token-minor so that the per-layer columns every metric reads are contiguous;
the files are plain ``.npy`` so ``numpy.load(..., mmap_mode="r")`` reads millions of tokens
without loading them. Several processes may fill one recording at once: rank 0 creates the
files (:meth:`PathWriter.create`), the others open them (:meth:`PathWriter.open`) and each
writes disjoint slices. ``meta.json`` says ``"complete": true`` only after
:meth:`PathWriter.finalize`; :func:`load_paths` refuses anything else.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

FORMAT_NAME = "pathmoe-expert-paths"
FORMAT_VERSION = 1
META_FILE = "meta.json"
EXPERTS_FILE = "experts.npy"
PROBS_FILE = "probs.npy"
TOKENS_FILE = "tokens.npy"
POSITIONS_FILE = "positions.npy"
EXPERT_DTYPE = np.uint8
PROB_DTYPE = np.float16
TOKEN_DTYPE = np.int32
MAX_EXPERTS = int(np.iinfo(EXPERT_DTYPE).max) + 1


class PathFormatError(ValueError):
    """A directory that is not a complete recording; the message names it and what to do."""


@dataclass
class ExpertPaths:
    """A recording in memory (or memory-mapped): see the module docstring for the arrays."""

    experts: np.ndarray
    probs: np.ndarray | None
    tokens: np.ndarray
    positions: np.ndarray
    num_experts: int
    layer_numbers: tuple[int, ...]
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.experts.ndim != 3:
            raise ValueError(f"experts must be [layers, topk, tokens], got {self.experts.shape}")
        L, _, N = self.experts.shape
        if len(self.layer_numbers) != L:
            raise ValueError(f"{len(self.layer_numbers)} layer numbers for {L} layers")
        if self.tokens.shape != (N,) or self.positions.shape != (N,):
            raise ValueError(f"tokens/positions must have shape ({N},)")
        if self.probs is not None and self.probs.shape != self.experts.shape:
            raise ValueError("probs must have the shape of experts")

    @property
    def num_layers(self) -> int:
        return self.experts.shape[0]

    @property
    def topk(self) -> int:
        return self.experts.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[2]

    @property
    def top1(self) -> np.ndarray:
        """uint8 [L, N]: the highest-probability expert of every token at every layer."""
        return self.experts[:, 0, :]

    def head(self, num_tokens: int) -> "ExpertPaths":
        """The first ``num_tokens`` tokens (views, no copy)."""
        n = min(num_tokens, self.num_tokens)
        return ExpertPaths(self.experts[:, :, :n], None if self.probs is None else
                           self.probs[:, :, :n], self.tokens[:n], self.positions[:n],
                           self.num_experts, self.layer_numbers, dict(self.info))


def _meta(num_tokens: int, layer_numbers: Sequence[int], num_experts: int, topk: int,
          complete: bool, info: dict) -> dict:
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "complete": complete,
            "num_tokens": int(num_tokens), "layer_numbers": [int(n) for n in layer_numbers],
            "num_experts": int(num_experts), "topk": int(topk), "info": info,
            "arrays": {"experts": [EXPERTS_FILE, np.dtype(EXPERT_DTYPE).name, "L,k,N"],
                       "probs": [PROBS_FILE, np.dtype(PROB_DTYPE).name, "L,k,N"],
                       "tokens": [TOKENS_FILE, np.dtype(TOKEN_DTYPE).name, "N"],
                       "positions": [POSITIONS_FILE, np.dtype(TOKEN_DTYPE).name, "N"]}}


def _write_json_atomic(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def _read_meta(directory: str) -> dict:
    path = os.path.join(directory, META_FILE)
    if not os.path.isfile(path):
        raise PathFormatError(f"{directory!r} is not an expert-path recording (no {META_FILE}); "
                              "record one with tools/analyze_paths.py")
    meta = json.load(open(path))
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise PathFormatError(f"{path}: not a {FORMAT_NAME} v{FORMAT_VERSION} recording")
    return meta


class PathWriter:
    """Fills a recording in place; several processes may write disjoint slices."""

    def __init__(self, directory: str, meta: dict, mode: str) -> None:
        self.directory = directory
        self.meta = meta
        self._layer_index = {n: i for i, n in enumerate(meta["layer_numbers"])}
        L, k, N = len(meta["layer_numbers"]), meta["topk"], meta["num_tokens"]
        opener = np.lib.format.open_memmap
        join = lambda name: os.path.join(directory, name)  # noqa: E731
        self.experts = opener(join(EXPERTS_FILE), mode, EXPERT_DTYPE, (L, k, N))
        self.probs = opener(join(PROBS_FILE), mode, PROB_DTYPE, (L, k, N))
        self.tokens = opener(join(TOKENS_FILE), mode, TOKEN_DTYPE, (N,))
        self.positions = opener(join(POSITIONS_FILE), mode, TOKEN_DTYPE, (N,))

    @classmethod
    def create(cls, directory: str, num_tokens: int, layer_numbers: Sequence[int],
               num_experts: int, topk: int) -> "PathWriter":
        """Allocate the files of a new recording (one process), replacing any old one."""
        if not 1 <= num_experts <= MAX_EXPERTS:
            raise ValueError(f"expert-path recordings hold 1..{MAX_EXPERTS} experts, "
                             f"got {num_experts}")
        if not 1 <= topk <= num_experts or num_tokens < 1 or not layer_numbers:
            raise ValueError(f"need 1 <= topk <= experts, tokens >= 1 and layers (got topk "
                             f"{topk}, {num_tokens} tokens, {len(layer_numbers)} layers)")
        os.makedirs(directory, exist_ok=True)
        meta = _meta(num_tokens, layer_numbers, num_experts, topk, complete=False, info={})
        _write_json_atomic(os.path.join(directory, META_FILE), meta)
        return cls(directory, meta, "w+")

    @classmethod
    def open(cls, directory: str) -> "PathWriter":
        """Open a recording another process created, to write this process's slices."""
        return cls(directory, _read_meta(directory), "r+")

    def write_layer(self, layer_number: int, start: int, experts: np.ndarray,
                    probs: np.ndarray) -> None:
        """``experts``/``probs`` [k, n] of MoE layer ``layer_number`` for tokens start..start+n."""
        try:
            index = self._layer_index[layer_number]
        except KeyError:
            raise ValueError(f"layer {layer_number} is not one of the recorded MoE layers "
                             f"{sorted(self._layer_index)}") from None
        stop = start + experts.shape[1]
        self.experts[index, :, start:stop] = experts
        self.probs[index, :, start:stop] = probs

    def write_tokens(self, start: int, tokens: np.ndarray, positions: np.ndarray) -> None:
        self.tokens[start:start + len(tokens)] = tokens
        self.positions[start:start + len(positions)] = positions

    def flush(self) -> None:
        for array in (self.experts, self.probs, self.tokens, self.positions):
            array.flush()

    def finalize(self, info: dict) -> None:
        """Mark the recording complete (one process, after every writer has flushed)."""
        self.flush()
        meta = _meta(self.meta["num_tokens"], self.meta["layer_numbers"],
                     self.meta["num_experts"], self.meta["topk"], complete=True, info=info)
        _write_json_atomic(os.path.join(self.directory, META_FILE), meta)
        self.meta = meta


def save_paths(directory: str, paths: ExpertPaths) -> None:
    """Write an in-memory recording (synthetic data, tests) in the same format."""
    writer = PathWriter.create(directory, paths.num_tokens, paths.layer_numbers,
                               paths.num_experts, paths.topk)
    for i, layer in enumerate(paths.layer_numbers):
        probs = (np.zeros(paths.experts[i].shape, PROB_DTYPE) if paths.probs is None
                 else paths.probs[i])
        writer.write_layer(layer, 0, paths.experts[i], probs)
    writer.write_tokens(0, paths.tokens, paths.positions)
    writer.finalize(paths.info)


def load_paths(directory: str, mmap: bool = True) -> ExpertPaths:
    """A complete recording, memory-mapped read-only by default."""
    meta = _read_meta(directory)
    if not meta.get("complete"):
        raise PathFormatError(f"{directory!r} is an incomplete recording (the run that wrote it "
                              "stopped early); record it again")
    mode = "r" if mmap else None
    load = lambda name: np.load(os.path.join(directory, name), mmap_mode=mode)  # noqa: E731
    paths = ExpertPaths(experts=load(EXPERTS_FILE), probs=load(PROBS_FILE),
                        tokens=load(TOKENS_FILE), positions=load(POSITIONS_FILE),
                        num_experts=meta["num_experts"],
                        layer_numbers=tuple(meta["layer_numbers"]), info=meta["info"])
    if paths.num_tokens != meta["num_tokens"] or paths.topk != meta["topk"]:
        raise PathFormatError(f"{directory!r}: array shapes disagree with {META_FILE}")
    return paths
