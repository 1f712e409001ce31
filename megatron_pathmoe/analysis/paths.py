"""The distribution of top-1 expert paths (paper sections 3.1, 5.1 and Appendix A).

A token's *expert path* is the sequence of its top-1 experts over the L MoE layers. Every
token gets one integer *path key*; equal keys mean equal paths. Counting keys gives the
empirical path distribution, from which:

- routing entropy ``H = -sum_p f_p log2 f_p`` in bits (``f_p``: fraction of tokens on path p,
  eq. 3.4 on the sample); its ceiling is ``min(L log2 E, log2 N)`` for N tokens;
- the number of unique paths, and the effective path space ``2**H``;
- the cumulative token coverage of the N most frequent paths (Figure 4);
- the most frequent paths themselves, and which tokens follow them.

Keys are exact when ``E**L <= 2**64`` (e.g. 16 experts x 16 layers): the path's digits in base
E. Longer paths (16 experts x 24 layers is 96 bits) are packed exactly into several 64-bit
words that are then mixed into one 64-bit key (splitmix64). Two distinct paths then share a key
with probability at most ``U**2 / 2**65`` over U distinct paths (1.4e-6 for the paper's ~7M);
:attr:`PathDistribution.collision_bound` reports that bound, 0 for exact keys. Sorting the
keys (one ``np.sort``) is the whole cost of the distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _layers_per_word(num_experts: int) -> int:
    """How many base-E digits fit in an unsigned 64-bit word (E**m <= 2**64)."""
    if num_experts < 2:
        return 64
    digits = 1
    while num_experts ** (digits + 1) <= 2 ** 64:
        digits += 1
    return digits


def _pack(top1: np.ndarray, num_experts: int) -> np.ndarray:
    """Exact base-E packing of ``top1`` [m, N] into uint64; needs E**m <= 2**64."""
    key = np.zeros(top1.shape[1], np.uint64)
    radix = np.uint64(num_experts)
    for column in top1:
        key *= radix
        key += column
    return key


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x *= _MIX1
    x ^= x >> np.uint64(27)
    x *= _MIX2
    x ^= x >> np.uint64(31)
    return x


def path_keys(top1: np.ndarray, num_experts: int) -> tuple[np.ndarray, bool]:
    """One uint64 key per token for its top-1 path ``top1`` [L, N]; returns (keys, exact)."""
    with np.errstate(over="ignore"):  # the mixing multiplies wrap around on purpose
        per_word = _layers_per_word(num_experts)
        if top1.shape[0] <= per_word:
            return _pack(top1, num_experts), True
        key = np.zeros(top1.shape[1], np.uint64)
        for start in range(0, top1.shape[0], per_word):
            key = _splitmix64(key * _GOLDEN ^ _pack(top1[start:start + per_word], num_experts))
        return key, False


@dataclass
class PathDistribution:
    """The distinct path keys (increasing) and how many tokens follow each."""

    keys: np.ndarray  # uint64 [U], increasing
    counts: np.ndarray  # int64 [U]
    num_tokens: int
    exact: bool

    @classmethod
    def from_keys(cls, keys: np.ndarray, exact: bool) -> "PathDistribution":
        if keys.size == 0:
            raise ValueError("no tokens: the path distribution needs at least one token")
        ordered = np.sort(keys)
        new = np.empty(ordered.size, bool)
        new[0] = True
        np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
        starts = np.flatnonzero(new)
        return cls(ordered[starts], np.diff(starts, append=ordered.size), int(keys.size), exact)

    @property
    def unique_paths(self) -> int:
        return int(self.counts.size)

    @property
    def entropy_bits(self) -> float:
        f = self.counts / self.num_tokens
        return float(-(f * np.log2(f)).sum()) + 0.0  # + 0.0: no -0.0 for a single path

    @property
    def effective_path_space(self) -> float:
        return float(2.0 ** self.entropy_bits)

    @property
    def collision_bound(self) -> float:
        return 0.0 if self.exact else min(1.0, float(self.unique_paths) ** 2 / 2.0 ** 65)

    def coverage(self, top_n: np.ndarray | list[int]) -> np.ndarray:
        """Fraction of tokens on the ``top_n`` most frequent paths, for each entry of top_n.

        Works on the histogram of path counts (how many paths have c tokens), so it needs no
        sort of the U paths by frequency."""
        paths_with = np.bincount(self.counts)
        sizes = np.flatnonzero(paths_with)[::-1]  # distinct path sizes, largest first
        paths_upto = np.cumsum(paths_with[sizes])  # paths of size >= sizes[i]
        tokens_upto = np.cumsum(paths_with[sizes] * sizes)
        n = np.minimum(np.asarray(top_n, np.int64), self.unique_paths)
        i = np.searchsorted(paths_upto, n)  # n falls among the paths of size sizes[i]
        i_clip = np.minimum(i, len(sizes) - 1)
        before_paths = np.where(i > 0, paths_upto[np.maximum(i - 1, 0)], 0)
        before_tokens = np.where(i > 0, tokens_upto[np.maximum(i - 1, 0)], 0)
        return (before_tokens + (n - before_paths) * sizes[i_clip]) / self.num_tokens

    def paths_to_cover(self, fraction: float) -> int:
        """Fewest paths whose tokens make up at least ``fraction`` of all tokens."""
        low, high = 1, self.unique_paths
        while low < high:  # coverage is increasing in the number of paths
            mid = (low + high) // 2
            if self.coverage([mid])[0] >= fraction - 1e-12:
                high = mid
            else:
                low = mid + 1
        return low

    def most_frequent(self, top: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and counts of the ``top`` most frequent paths (ties: smaller key first)."""
        top = min(top, self.unique_paths)
        if top < 1:
            return self.keys[:0], self.counts[:0]
        cut = -np.partition(-self.counts, top - 1)[top - 1]  # the top-th largest count
        above = np.flatnonzero(self.counts > cut)
        tied = np.flatnonzero(self.counts == cut)[:top - above.size]  # keys increase
        candidates = np.concatenate((above, tied))
        order = candidates[np.lexsort((candidates, -self.counts[candidates]))]
        return self.keys[order], self.counts[order]

    def rank_of(self, keys: np.ndarray, top: int) -> np.ndarray:
        """int32 per token: its path's frequency rank (0 = most frequent) if that rank is
        below ``top``, else -1."""
        top_keys, _ = self.most_frequent(top)
        if top_keys.size == 0:
            return np.full(keys.shape, -1, np.int32)
        order = np.argsort(top_keys)
        sorted_top = top_keys[order]
        pos = np.minimum(np.searchsorted(sorted_top, keys), sorted_top.size - 1)
        return np.where(sorted_top[pos] == keys, order[pos], -1).astype(np.int32)


def coverage_grid(unique_paths: int, points_per_decade: int = 8) -> np.ndarray:
    """1, ..., unique_paths on a log scale (the x axis of the coverage curve)."""
    decades = math.log10(max(unique_paths, 1))
    grid = np.unique(np.round(np.logspace(0, decades, int(decades * points_per_decade) + 2)))
    return grid.astype(np.int64)


def path_statistics(top1: np.ndarray, num_experts: int) -> tuple[PathDistribution, np.ndarray]:
    """The distribution of the top-1 paths ``top1`` [L, N] and every token's key."""
    keys, exact = path_keys(top1, num_experts)
    return PathDistribution.from_keys(keys, exact), keys


def first_token_of_rank(ranks: np.ndarray, count: int) -> np.ndarray:
    """Index of the first token with each rank 0..count-1 (ranks from ``rank_of``)."""
    return np.array([int(np.argmax(ranks == r)) for r in range(count)], dtype=np.int64)
