"""All path metrics of one recording, as a JSON-ready dict (the report of tools/analyze_paths.py).

Independent metrics run on a small thread pool: numpy releases the GIL in sorting and in its
element-wise kernels, so the path distribution (one big sort) overlaps with the alignment and
the per-layer comparisons.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from megatron_pathmoe.analysis.alignment import align_layers
from megatron_pathmoe.analysis.categories import (
    CATEGORIES,
    category_by_path,
    cluster_concentration,
    vocabulary_categories,
)
from megatron_pathmoe.analysis.consistency import (
    consistency_by_window,
    engagement_runs,
    pair_jaccard,
    routing_correlation,
    usage_entropy_by_layer,
)
from megatron_pathmoe.analysis.load import balance_statistics, expert_load
from megatron_pathmoe.analysis.path_arrays import ExpertPaths
from megatron_pathmoe.analysis.paths import (
    PathDistribution,
    coverage_grid,
    first_token_of_rank,
    path_statistics,
)

DEFAULT_WINDOWS = tuple(range(2, 13))
DEFAULT_TOP_PATHS = 20


def path_entropy_section(dist: PathDistribution, num_layers: int, num_experts: int) -> dict:
    return {"entropy_bits": dist.entropy_bits, "unique_paths": dist.unique_paths,
            "effective_path_space": dist.effective_path_space,
            "max_entropy_bits": min(num_layers * math.log2(num_experts),
                                    math.log2(dist.num_tokens)),
            "key": "exact" if dist.exact else "hash64",
            "key_collision_bound": dist.collision_bound}


def coverage_section(dist: PathDistribution) -> dict:
    grid = coverage_grid(dist.unique_paths)
    return {"top_n": grid.tolist(), "fraction": dist.coverage(grid).tolist(),
            "paths_for_50_percent": dist.paths_to_cover(0.5),
            "paths_for_90_percent": dist.paths_to_cover(0.9)}


def top_paths_section(dist: PathDistribution, keys: np.ndarray, top1: np.ndarray,
                      top: int) -> tuple[list[dict], np.ndarray]:
    """The most frequent paths (expert per layer) and every token's path rank (-1: other)."""
    ranks = dist.rank_of(keys, top)
    _, counts = dist.most_frequent(top)
    first = first_token_of_rank(ranks, len(counts))
    rows = [{"rank": r, "tokens": int(c), "fraction": float(c / dist.num_tokens),
             "experts": top1[:, i].tolist()} for r, (c, i) in enumerate(zip(counts, first))]
    return rows, ranks


def categories_section(ranks: np.ndarray, tokens: np.ndarray, token_texts: list[str],
                       num_paths: int) -> dict:
    vocab_categories = vocabulary_categories(token_texts)
    if tokens.size and int(tokens.max()) >= len(vocab_categories):
        raise ValueError(f"token id {int(tokens.max())} is outside the tokenizer's vocabulary "
                         f"({len(vocab_categories)} entries)")
    category = vocab_categories[tokens]
    table = category_by_path(ranks, category, num_paths)
    overall = np.bincount(category, minlength=len(CATEGORIES))
    return {"names": list(CATEGORIES), "by_path": table.tolist(),
            "overall_fraction": (overall / max(overall.sum(), 1)).tolist(),
            **cluster_concentration(table)}


def path_report(paths: ExpertPaths, token_texts: list[str] | None = None,
                top_paths: int = DEFAULT_TOP_PATHS, windows=DEFAULT_WINDOWS,
                workers: int = 2) -> dict:
    """Every metric of :mod:`megatron_pathmoe.analysis` for one recording. ``token_texts``
    (text of each vocabulary id) enables the category analysis."""
    E, L = paths.num_experts, paths.num_layers
    top1 = paths.top1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        distribution = pool.submit(path_statistics, top1, E)
        load = pool.submit(expert_load, paths.experts, E)
        alignment = align_layers(top1, E)
        jaccard = pool.submit(pair_jaccard, paths.experts, alignment.frames)
        runs = pool.submit(engagement_runs, top1, alignment.frames)
        usage = pool.submit(usage_entropy_by_layer, paths.experts, alignment.frames)
        dist, keys = distribution.result()
        top_rows, ranks = top_paths_section(dist, keys, top1, top_paths)
        run_counts = runs.result()[1:]
        report = {
            "tokens": paths.num_tokens, "layers": L, "experts": E, "topk": paths.topk,
            "layer_numbers": list(paths.layer_numbers),
            "path_entropy": path_entropy_section(dist, L, E),
            "coverage": coverage_section(dist),
            "top_paths": top_rows,
            "correlation": routing_correlation(alignment),
            "consistency": {"pair_jaccard": jaccard.result().tolist(),
                            "by_window": consistency_by_window(jaccard.result(), windows)},
            "engagement": {"run_length_fraction": (run_counts / run_counts.sum()).tolist(),
                           "mean_run_length": float((np.arange(1, L + 1) * run_counts).sum()
                                                    / run_counts.sum())},
            "usage_entropy_bits": usage.result().tolist(),
        }
        loads = load.result()
        report["expert_load"] = {"load": loads.tolist(), **balance_statistics(loads)}
    if token_texts is not None:
        report["categories"] = categories_section(ranks, np.asarray(paths.tokens), token_texts,
                                                  len(top_rows))
    return report
