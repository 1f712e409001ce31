"""Path restriction (paper section 5.2): record the most frequent expert paths, then train with
every token's routing confined to them.

**Paths.** A token's expert path is its top-1 expert at every MoE layer: the selected expert
with the largest gate probability (``probs.argmax``), which every router variant returns.
:func:`count_top1_paths` runs a model over batches and counts paths; :func:`write_paths_file`
stores the K most frequent as ``<stem>.npy`` (int32 [K, num_layers], most frequent first) plus
``<stem>.json`` (counts, coverage, model shape, source). ``--moe-path-restriction <stem>.npy``
restricts training to them (``--moe-path-restriction-top-k`` takes the first K rows).

**Mapping a token onto an allowed path.** A token follows the allowed path that maximises the
sum over layers of its router log-probabilities, decided layer by layer: layer l's decision
must be made before layer l+1's hidden state (hence its probabilities) exists. At layer l the
candidates are the allowed paths that agree with the token's experts at layers 1..l-1 (all K
at layer 1); they share that prefix, so the one maximising sum_{j<=l} log p_j is the one whose
layer-l expert has the highest router score now. The token's top-1 expert at layer l is
therefore the highest-scoring expert among its candidates' layer-l experts, and the candidates
shrink to the paths through it. The set never empties (the chosen expert comes from a
candidate), and the realised top-1 path is always one of the allowed paths. With top-k > 1 the
remaining k-1 experts are the best-scoring others, unrestricted; gate probabilities are the
router's own (the restriction changes which experts are selected, not their scores). Aux-loss
statistics are megatron's (computed from the unrestricted top-k).

The selection plugs into megatron's top-k replay seam (``TopKRouter.router_replay``), so the
score function, pre-softmax, expert bias and aux/z losses are megatron's own code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch

PATHS_FORMAT = "megatron-pathmoe-expert-paths"


# --------------------------------------------------------------------------- file format

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
                                "`python -m megatron_pathmoe.routing.record_paths`")
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


# --------------------------------------------------------------------------- counting

class Top1PathRecorder:
    """Forward hooks on every megatron ``Router`` of a model: each forward's top-1 expert per
    layer, stacked into [tokens, layers] and counted. Needs all layers on this rank (PP=1)."""

    def __init__(self, model: torch.nn.Module, num_layers: int) -> None:
        from megatron.core.transformer.moe.router import Router

        self.num_layers = num_layers
        self.counts: dict[bytes, int] = {}
        self.num_tokens = 0
        self._current: dict[int, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._hook) for m in model.modules()
                         if isinstance(m, Router)]
        if len(self._handles) != num_layers:
            raise ValueError(f"path recording needs every MoE layer on this rank: found "
                             f"{len(self._handles)} routers for {num_layers} layers (use "
                             "--pipeline-model-parallel-size 1)")

    def _hook(self, router: torch.nn.Module, inputs: Any, output: Any) -> None:
        probs, _ = output
        self._current[router.layer_number] = probs.detach().argmax(dim=-1).cpu()

    def end_forward(self) -> None:
        """Count the paths of the forward that just ran."""
        if len(self._current) != self.num_layers:
            raise RuntimeError(f"a forward reached {len(self._current)} of {self.num_layers} "
                               "routers")
        rows = torch.stack([self._current[l] for l in sorted(self._current)], dim=1)
        self._current.clear()
        unique, counts = np.unique(rows.numpy().astype(np.int32), axis=0, return_counts=True)
        for row, count in zip(unique, counts):
            key = row.tobytes()
            self.counts[key] = self.counts.get(key, 0) + int(count)
        self.num_tokens += rows.shape[0]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@dataclass
class PathCounts:
    paths: np.ndarray  # int32 [num_unique, num_layers], most frequent first
    counts: np.ndarray  # int64 [num_unique]
    num_tokens: int

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.paths[:k], self.counts[:k]


def _merge_across_ranks(counts: dict[bytes, int], num_tokens: int) -> tuple[dict, int]:
    """Every rank holds disjoint tokens with PP=1 (DP splits samples, sequence parallelism
    splits each sample over TP ranks): the global counts are the sum."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return counts, num_tokens
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (counts, num_tokens))
    merged: dict[bytes, int] = {}
    for rank_counts, _ in gathered:
        for key, count in rank_counts.items():
            merged[key] = merged.get(key, 0) + count
    return merged, sum(n for _, n in gathered)


def sorted_path_counts(counts: dict[bytes, int], num_tokens: int, num_layers: int) -> PathCounts:
    """Most frequent first; equal counts by path (lexicographic), so the order is stable."""
    if not counts:
        return PathCounts(np.zeros((0, num_layers), np.int32), np.zeros(0, np.int64), num_tokens)
    paths = np.stack([np.frombuffer(key, dtype=np.int32) for key in counts])
    values = np.array(list(counts.values()), dtype=np.int64)
    order = np.lexsort([*paths.T[::-1], -values])
    return PathCounts(paths[order], values[order], num_tokens)


@torch.no_grad()
def count_top1_paths(model: torch.nn.Module, batches: Iterable[Any], num_layers: int,
                     forward: Callable[[torch.nn.Module, Any], Any],
                     progress: Callable[[int], None] | None = None) -> PathCounts:
    """Run ``forward(model, batch)`` for every batch (eval mode) and count the top-1 paths of
    all tokens, summed over ranks. ``progress(tokens)`` is called after each batch."""
    model.eval()
    recorder = Top1PathRecorder(model, num_layers)
    try:
        for batch in batches:
            forward(model, batch)
            before = recorder.num_tokens
            recorder.end_forward()
            if progress is not None:
                progress(recorder.num_tokens - before)
    finally:
        recorder.remove()
    counts, num_tokens = _merge_across_ranks(recorder.counts, recorder.num_tokens)
    return sorted_path_counts(counts, num_tokens, num_layers)


# --------------------------------------------------------------------------- restricted routing

class PathRestriction:
    """The allowed paths of one model build, and per layer the top-k selection that keeps each
    token on them (see the module docstring for the definition)."""

    def __init__(self, paths: np.ndarray, num_experts: int) -> None:
        self.paths = torch.as_tensor(paths, dtype=torch.long)  # [K, L]
        self.num_layers = self.paths.shape[1]
        self.num_experts = num_experts

    @classmethod
    def from_config(cls, config: Any) -> "PathRestriction | None":
        if not getattr(config, "moe_path_restriction", None):
            return None
        paths = read_paths_file(config.moe_path_restriction, config.num_layers,
                                config.num_experts).paths
        if config.moe_path_restriction_top_k is not None:
            paths = paths[:config.moe_path_restriction_top_k]
        return cls(paths, config.num_experts)

    def for_layer(self, layer_number: int, carry: Any) -> "LayerPathRestriction":
        return LayerPathRestriction(self, layer_number, carry)


_OPEN_PATHS_KEY = "restriction.open_paths"


class LayerPathRestriction:
    """Megatron's top-k replay hook (``get_replay_topk``) for one layer."""

    def __init__(self, restriction: PathRestriction, layer_number: int, carry: Any) -> None:
        self.restriction = restriction
        self.layer_number = layer_number
        self.carry = carry
        # This layer's expert on each path [K], and as one-hot rows [K, experts].
        self._layer_experts = restriction.paths[:, layer_number - 1]
        self._on_path = torch.nn.functional.one_hot(self._layer_experts, restriction.num_experts)

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._layer_experts.device != device:
            self._layer_experts = self._layer_experts.to(device)
            self._on_path = self._on_path.to(device)
        return self._layer_experts, self._on_path

    def get_replay_topk(self, scores: torch.Tensor, topk: int, num_groups: int | None = None,
                        group_topk: int | None = None,
                        default_compute_topk: Callable | None = None):
        if group_topk:
            raise ValueError("path restriction does not support group-limited routing")
        tokens = scores.shape[0]
        r = self.restriction
        layer_experts, on_path = self._on(scores.device)
        if self.layer_number == 1:
            open_paths = torch.ones(tokens, len(layer_experts), dtype=torch.bool,
                                    device=scores.device)
        else:
            last = self.layer_number == r.num_layers
            open_paths = self.carry.get(_OPEN_PATHS_KEY, tokens,
                                        f"path restriction of layer {self.layer_number}",
                                        last_reader=last)
        # The best-scoring expert that some still-open path uses at this layer.
        allowed = (open_paths.to(scores.dtype) @ on_path.to(scores.dtype)) > 0
        first = scores.detach().masked_fill(~allowed, float("-inf")).argmax(-1, keepdim=True)
        if self.layer_number < r.num_layers:
            self.carry.put(_OPEN_PATHS_KEY, open_paths & (layer_experts[None, :] == first))
        indices = first
        if topk > 1:
            others = scores.detach().scatter(1, first, float("-inf"))
            indices = torch.cat([first, others.topk(topk - 1, dim=-1).indices], dim=-1)
        return scores.gather(1, indices), indices
