"""Cross-layer agreement of routing decisions (paper section 7.1, 7.2 and Appendix A).

All metrics here compare experts after :mod:`~megatron_pathmoe.analysis.alignment`. Definitions
(the paper names the measurements; where it leaves the formula open, these are the choices):

- **Routing-decision correlation** of layers l, l+1 (Appendix A, "85.6% vs 62%"): the fraction
  of tokens whose top-1 expert at l+1 is the expert matched with their top-1 expert at l, i.e.
  the diagonal mass ``sum_i P(e_l = i, e_{l+1} = pi(i))`` of the aligned joint distribution.
  Section 3.3 derives PathMoE's correlation as exactly this diagonal concentration ("the
  probability of selecting the same expert at both layers"), and it is a percentage as in the
  paper. Cramér's V of the unaligned co-occurrence table is reported beside it as an
  alignment-free association measure (1 when one layer's choice determines the next).
- **Path consistency** over a window of w consecutive layers: the mean Jaccard similarity
  ``|A_l n A_{l+1}| / |A_l u A_{l+1}|`` of a token's aligned top-k expert sets A at the w-1
  consecutive pairs inside the window, averaged over tokens and over all L-w+1 window
  positions. Identical decisions give 1; independent uniform top-k give about k/(2E-k)
  (for k << E).
- **Sustained engagement**: maximal runs of consecutive layers in which a token keeps the same
  aligned top-1 expert; reported as the fraction of runs lasting exactly X layers (X = 1..L).
- **Per-token expert-usage entropy by layer** (Figure 8a): for layer l, the entropy in bits of
  a token's distribution of aligned top-k experts over layers 1..l (each layer contributes its
  k experts once), averaged over tokens. It is log2(k) when a token keeps the same k experts,
  and at most log2(min(E, k*l)).
"""

from __future__ import annotations

import numpy as np

from megatron_pathmoe.analysis.alignment import LayerAlignment, cramers_v
from megatron_pathmoe.analysis.counting import CHUNK, histogram


def routing_correlation(alignment: LayerAlignment) -> dict:
    """Per consecutive pair and mean: aligned top-1 agreement and Cramér's V."""
    agreement = alignment.agreement()
    v = [cramers_v(c) for c in alignment.cooccurrence]
    known = [x for x in v if x is not None]
    return {"agreement": agreement.tolist(),
            "mean_agreement": float(agreement.mean()) if agreement.size else None,
            "cramers_v": v, "mean_cramers_v": float(np.mean(known)) if known else None}


def _mask_dtype(num_experts: int) -> np.dtype:
    bits = min(num_experts, 64)
    return np.dtype(next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64)
                         if np.iinfo(t).bits >= bits))


def _remap_table(frame: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """[2**E]: the mask of a set of layer experts -> the mask of their aligned ids."""
    masks = np.arange(1 << len(frame), dtype=np.int64)
    out = np.zeros(masks.size, np.int64)
    for expert, aligned in enumerate(frame):
        out |= ((masks >> expert) & 1) << int(aligned)
    return out.astype(dtype)


def expert_masks(experts: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """[words, N] bit masks (bit = aligned expert id, 64 per word) of the sets ``experts``
    [k, N] after mapping ids through ``frame`` [E]. Sets of up to 16 experts are shifted into
    a mask first and remapped by a 2**E table, the cheapest way for the common sizes."""
    E = len(frame)
    dtype = _mask_dtype(E)
    one = dtype.type(1)
    if E <= 16:
        mask = np.left_shift(one, experts[0], dtype=dtype)
        for rank in experts[1:]:
            mask |= np.left_shift(one, rank, dtype=dtype)
        return _remap_table(frame, dtype)[mask][None]
    masks = np.zeros((-(-E // 64), experts.shape[1]), dtype)
    for rank in experts:
        aligned = frame[rank]
        for word, bits in enumerate(masks):
            inside = (aligned >> 6) == word
            bits |= np.where(inside, np.left_shift(one, aligned & 63, dtype=dtype), dtype.type(0))
    return masks


def pair_jaccard(experts: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """[L-1]: mean over tokens of the Jaccard similarity of the aligned top-k sets of
    ``experts`` [L, k, N] at l and l+1 (``frames`` [L, E] from the alignment)."""
    L, k, _ = experts.shape
    result = np.zeros(max(L - 1, 0))
    previous = expert_masks(experts[0], frames[0])
    for l in range(1, L):
        current = expert_masks(experts[l], frames[l])
        shared = sum(np.bitwise_count(a & b) for a, b in zip(previous, current))
        # |A| = |B| = k, so |A u B| = 2k - |A n B|; count tokens per intersection size.
        per_size = [np.count_nonzero(shared == i) for i in range(1, k + 1)]
        result[l - 1] = sum(n * i / (2 * k - i) for i, n in enumerate(per_size, 1)) / shared.size
        previous = current
    return result


def window_weights(num_layers: int, window: int) -> np.ndarray:
    """[L-1]: how many of the L-window+1 windows of ``window`` layers contain each pair."""
    pairs = np.arange(num_layers - 1)
    starts = np.arange(num_layers - window + 1)
    return ((starts[:, None] <= pairs) & (pairs <= starts[:, None] + window - 2)).sum(0)


def consistency_by_window(jaccard: np.ndarray, windows: range | list[int]) -> dict[int, float]:
    """Path consistency for each window size (see the module docstring) from ``pair_jaccard``."""
    L = len(jaccard) + 1
    result = {}
    for w in windows:
        if 2 <= w <= L:
            weights = window_weights(L, w)
            result[w] = float((weights * jaccard).sum() / weights.sum())
    return result


def engagement_runs(top1: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """int64 [L+1]: number of maximal runs of the same aligned top-1 expert lasting 1..L
    layers, over all tokens of ``top1`` [L, N] (index 0 unused)."""
    L = top1.shape[0]
    runs = np.zeros(L + 1, np.int64)
    current = np.ones(top1.shape[1], np.uint8)
    previous = frames[0][top1[0]]
    for l in range(1, L):
        aligned = frames[l][top1[l]]
        same = aligned == previous
        ended = histogram(np.where(same, np.uint8(0), current), L + 1)
        runs[1:] += ended[1:]
        current = np.where(same, current + np.uint8(1), np.uint8(1))
        previous = aligned
    runs += histogram(current, L + 1)
    runs[0] = 0
    return runs


def usage_entropy_by_layer(experts: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """[L]: mean over tokens of the entropy (bits) of each token's aligned top-k expert usage
    over layers 1..l (``experts`` [L, k, N], ``frames`` [L, E]). Counts are updated
    incrementally: when an expert's count goes from c to c+1, ``sum_e c_e log2 c_e`` grows by
    ``(c+1) log2(c+1) - c log2 c``. A token's k experts at one layer are distinct (top-k)."""
    L, k, N = experts.shape
    E = frames.shape[1]
    c = np.arange(L + 1, dtype=np.float64)
    step = np.diff(c * np.log2(np.maximum(c, 1)))  # step[c]: growth of c log2 c from c to c+1
    totals = np.zeros(L)
    chunk = CHUNK // 4  # the per-token counts (chunk x E bytes) stay in cache
    for start in range(0, N, chunk):
        n = min(chunk, N - start)
        counts = np.zeros(n * E, np.uint8)
        base = np.arange(n, dtype=np.int64) * E
        sum_xlogx = np.zeros(n)
        for l in range(L):
            index = base + frames[l][experts[l, :, start:start + n]]  # [k, n]
            before = counts[index]
            sum_xlogx += step[before].sum(0)
            counts[index] = before + 1
            totals[l] += sum_xlogx.sum()
    used = k * np.arange(1, L + 1, dtype=np.float64)
    return np.log2(used) - totals / (N * used)
