"""Expert indices aligned across layers (paper section 7.1).

Expert 3 of layer l has nothing to do with expert 3 of layer l+1 unless the two layers share a
router. Before comparing decisions across layers, every consecutive pair (l, l+1) is aligned by
the one-to-one matching of their experts that maximises top-1 agreement: the assignment
problem on the top-1 co-occurrence matrix ``C_l[i, j] = #{tokens: top1_l = i, top1_{l+1} = j}``
(Hungarian algorithm, :func:`min_cost_assignment`). Chaining the matchings maps
every layer's experts into the frame of the first MoE layer, so a token's experts at all
layers can be compared directly. Layers that share a router (PathMoE blocks) come out aligned
by the identity, as they should.

The alignment uses top-1 decisions only (the paper's analysis unit); the top-2.. experts of a
token are carried along by the same matching. Experts never chosen as top-1 at a layer are
matched arbitrarily among themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_pathmoe.analysis.counting import pair_histogram


def min_cost_assignment(cost: np.ndarray) -> np.ndarray:
    """``col[i]``: the column given to row i by a one-to-one assignment of least total cost of
    the square matrix ``cost`` (Hungarian algorithm with potentials, O(n^3); the inner loop
    over columns is vectorised). E is at most 256 here, so this costs milliseconds and spares
    a scipy import of several seconds."""
    n = cost.shape[0]
    if cost.shape != (n, n):
        raise ValueError(f"the assignment needs a square matrix, got {cost.shape}")
    a = np.asarray(cost, np.float64)
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    row_of = np.zeros(n + 1, np.int64)  # row_of[j]: 1-based row matched to column j (0: none)
    way = np.zeros(n + 1, np.int64)
    for i in range(1, n + 1):
        row_of[0], j0 = i, 0
        min_reduced = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, bool)
        while row_of[j0] != 0:
            used[j0] = True
            i0 = row_of[j0]
            reduced = a[i0 - 1] - u[i0] - v[1:]
            better = ~used[1:] & (reduced < min_reduced[1:])
            min_reduced[1:][better] = reduced[better]
            way[1:][better] = j0
            j1 = int(np.argmin(np.where(used[1:], np.inf, min_reduced[1:]))) + 1
            delta = min_reduced[j1]
            u[row_of[used]] += delta
            v[used] -= delta
            min_reduced[~used] -= delta
            j0 = j1
        while j0:  # augment along the alternating path
            j1 = way[j0]
            row_of[j0] = row_of[j1]
            j0 = j1
    col = np.empty(n, np.int64)
    col[row_of[1:] - 1] = np.arange(n)
    return col


def best_matching(cooccurrence: np.ndarray) -> np.ndarray:
    """``to_next[i]``: the expert of the next layer matched with expert i (max total agreement)."""
    return min_cost_assignment(-np.asarray(cooccurrence, np.float64))


@dataclass
class LayerAlignment:
    """The matchings of consecutive layers and the frames they induce."""

    cooccurrence: np.ndarray  # int64 [L-1, E, E]: top-1 pairs (layer l, layer l+1)
    to_next: np.ndarray  # int64 [L-1, E]: expert i of layer l <-> to_next[l, i] of layer l+1
    frames: np.ndarray  # uint8 [L, E]: layer-l expert id -> id in the first layer's frame

    @property
    def num_tokens(self) -> int:
        return int(self.cooccurrence[0].sum()) if len(self.cooccurrence) else 0

    def agreement(self) -> np.ndarray:
        """[L-1]: fraction of tokens whose top-1 expert at l+1 is the matched expert of l."""
        matched = np.take_along_axis(self.cooccurrence, self.to_next[:, :, None], axis=2)
        return matched.sum(axis=(1, 2)) / max(self.num_tokens, 1)

    def align(self, experts: np.ndarray) -> np.ndarray:
        """``experts`` [L, ...] expressed in the first layer's frame (same shape, uint8)."""
        aligned = np.empty(experts.shape, np.uint8)
        for layer, frame in enumerate(self.frames):
            aligned[layer] = frame[experts[layer]]
        return aligned


def align_layers(top1: np.ndarray, num_experts: int) -> LayerAlignment:
    """Align the experts of ``top1`` [L, N] (uint8) layer by layer; see the module docstring."""
    L = top1.shape[0]
    cooc = np.stack([pair_histogram(top1[l], top1[l + 1], num_experts) for l in range(L - 1)]) \
        if L > 1 else np.zeros((0, num_experts, num_experts), np.int64)
    to_next = np.stack([best_matching(c) for c in cooc]) if L > 1 else \
        np.zeros((0, num_experts), np.int64)
    frames = np.empty((L, num_experts), np.uint8)
    frames[0] = np.arange(num_experts)
    for l in range(L - 1):
        # Expert to_next[l, i] of layer l+1 is expert i of layer l, i.e. frames[l][i].
        frames[l + 1, to_next[l]] = frames[l]
    return LayerAlignment(cooc, to_next, frames)


def cramers_v(table: np.ndarray) -> float | None:
    """Cramér's V of a contingency table (0: independent, 1: one determines the other);
    None when a margin has fewer than two used categories."""
    rows, cols = table.sum(1), table.sum(0)
    table = table[rows > 0][:, cols > 0].astype(np.float64)
    rows, cols = rows[rows > 0], cols[cols > 0]
    n, k = table.sum(), min(len(rows), len(cols))
    if k < 2 or n == 0:
        return None
    expected = np.outer(rows, cols) / n
    chi2 = ((table - expected) ** 2 / expected).sum()
    return float(np.sqrt(chi2 / (n * (k - 1))))
