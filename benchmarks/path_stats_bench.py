"""Path statistics at the paper's Appendix A scale: 7.18M tokens x 24 MoE layers, 16 experts,
top-4 (synthetic routing with inter-layer correlation, relabelled per layer).

Times what ``tools/analyze_paths.py`` computes for the target of issue #9 (routing entropy,
unique paths and path consistency, which needs the cross-layer alignment), on one thread and
on the report's two-thread pool, against a straightforward numpy baseline measured in the same
run: ``np.unique(paths, axis=0)`` for the path distribution and aligned-id comparisons
(k x k equality tests per layer pair) for the Jaccard consistency. The other metrics of the
report are timed for information. Prints a markdown table.

    OMP_NUM_THREADS=1 python benchmarks/path_stats_bench.py            # ~2 min with baseline
    python benchmarks/path_stats_bench.py --tokens 1000000 --skip-baseline
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_pathmoe.analysis.alignment import align_layers  # noqa: E402
from megatron_pathmoe.analysis.consistency import (  # noqa: E402
    consistency_by_window,
    engagement_runs,
    pair_jaccard,
    routing_correlation,
    usage_entropy_by_layer,
)
from megatron_pathmoe.analysis.load import expert_load  # noqa: E402
from megatron_pathmoe.analysis.paths import path_statistics  # noqa: E402
from megatron_pathmoe.analysis.report import DEFAULT_WINDOWS, path_report  # noqa: E402
from megatron_pathmoe.analysis.synthetic import synthetic_paths  # noqa: E402


def target_one_thread(paths) -> dict:
    dist, _ = path_statistics(paths.top1, paths.num_experts)
    alignment = align_layers(paths.top1, paths.num_experts)
    jaccard = pair_jaccard(paths.experts, alignment.frames)
    return {"entropy": dist.entropy_bits, "unique": dist.unique_paths,
            "correlation": routing_correlation(alignment)["mean_agreement"],
            "consistency": consistency_by_window(jaccard, DEFAULT_WINDOWS)}


def target_two_threads(paths) -> dict:
    """The report's split: the path sort on one thread, alignment + Jaccard on the other."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        dist = pool.submit(path_statistics, paths.top1, paths.num_experts)
        alignment = align_layers(paths.top1, paths.num_experts)
        jaccard = pair_jaccard(paths.experts, alignment.frames)
        dist = dist.result()[0]
    return {"entropy": dist.entropy_bits, "unique": dist.unique_paths,
            "correlation": routing_correlation(alignment)["mean_agreement"],
            "consistency": consistency_by_window(jaccard, DEFAULT_WINDOWS)}


def baseline(paths) -> dict:
    """Row-unique of the [N, L] path matrix; Jaccard by comparing aligned expert ids."""
    _, counts = np.unique(np.ascontiguousarray(paths.top1.T), axis=0, return_counts=True)
    f = counts / counts.sum()
    alignment = align_layers(paths.top1, paths.num_experts)
    k = paths.topk
    jaccard = []
    previous = alignment.frames[0][paths.experts[0]]
    for l in range(1, paths.num_layers):
        current = alignment.frames[l][paths.experts[l]]
        shared = sum((previous[a] == current[b]).astype(np.int64)
                     for a in range(k) for b in range(k))
        jaccard.append(float((shared / (2 * k - shared)).mean()))
        previous = current
    return {"entropy": float(-(f * np.log2(f)).sum()), "unique": int(counts.size),
            "consistency": consistency_by_window(np.asarray(jaccard), DEFAULT_WINDOWS)}


def timed(fn, *args, rounds: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(rounds):
        start = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=7_180_000)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="median of this many rounds")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args()

    t0 = time.perf_counter()
    paths = synthetic_paths(args.tokens, args.layers, args.experts, args.topk, stay=0.6,
                            stay_in_block=0.9, block_size=4, seed=0)
    print(f"# {args.tokens:,} tokens x {args.layers} layers, {args.experts} experts top-"
          f"{args.topk} (synthetic, generated in {time.perf_counter() - t0:.0f} s); "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, numpy "
          f"{np.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")

    rows = []
    one_times, two_times = [], []
    for _ in range(args.rounds):  # interleaved, so that load from other processes hits both
        seconds, result = timed(target_one_thread, paths, rounds=1)
        one_times.append(seconds)
        seconds, result2 = timed(target_two_threads, paths, rounds=1)
        two_times.append(seconds)
        assert result == result2
    one, two = statistics.median(one_times), statistics.median(two_times)
    base = None
    if not args.skip_baseline:
        base, reference = timed(baseline, paths, rounds=1)
        assert reference["unique"] == result["unique"]
        assert abs(reference["entropy"] - result["entropy"]) < 1e-9
        assert all(abs(reference["consistency"][w] - v) < 1e-9
                   for w, v in result["consistency"].items())
    rows.append(("entropy + unique + consistency, 1 thread", one, base))
    rows.append(("entropy + unique + consistency, 2 threads", two, base))
    top1 = paths.top1
    dist_s, _ = timed(path_statistics, top1, args.experts, rounds=args.rounds)
    align_s, alignment = timed(align_layers, top1, args.experts, rounds=args.rounds)
    jac_s, _ = timed(pair_jaccard, paths.experts, alignment.frames, rounds=args.rounds)
    rows += [("  of which: path keys + distribution", dist_s, None),
             ("  of which: alignment (23 pair histograms + Hungarian)", align_s, None),
             ("  of which: pair Jaccard (top-4 sets)", jac_s, None)]
    for name, fn, fn_args in (
            ("sustained engagement", engagement_runs, (top1, alignment.frames)),
            ("usage entropy by layer", usage_entropy_by_layer, (paths.experts, alignment.frames)),
            ("expert load", expert_load, (paths.experts, args.experts)),
            ("full path_report (2 threads, no categories)", path_report, (paths,))):
        rows.append((name, timed(fn, *fn_args, rounds=1)[0], None))

    print(f"\nH = {result['entropy']:.2f} bits, {result['unique']:,} unique paths, correlation "
          f"{100 * result['correlation']:.1f}%, consistency(w=2) "
          f"{100 * result['consistency'][2]:.1f}%\n")
    print("| computation | seconds | baseline (s) | speed-up vs baseline |")
    print("|---|---:|---:|---:|")
    for name, seconds, base_s in rows:
        ratio = f"{base_s / seconds:.1f}x" if base_s else ""
        print(f"| {name} | {seconds:.2f} | {f'{base_s:.1f}' if base_s else ''} | {ratio} |")


if __name__ == "__main__":
    main()
