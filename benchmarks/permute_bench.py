"""Token permutation: permute + unpermute, forward + backward, custom ops vs megatron-core.

Implementations, timed in the same process with rounds interleaved (machine noise hits all):
  custom     megatron_pathmoe.ops (csrc/ kernels)
  megatron   megatron-core 0.16.1's unfused moe_utils.permute/unpermute (the baseline)
  reference  megatron_pathmoe.ops.reference (pure PyTorch)
  te-fused   megatron-core's fused=True path (transformer-engine), on CUDA when installed

Modes:
  dispatch   as megatron-core's dispatchers call them: probs permuted alongside the tokens,
             unpermute unweighted (the experts apply the probs)
  weighted   unpermute weighted by the probs (merging probs), whose backward also yields the
             probs gradient

Byte model (each input read once, each output written once; indices, routing map and probs
are < 1% and not counted): R = tokens*hidden*s, P = tokens*topk*hidden*s. Each of permute fwd,
unpermute fwd, unpermute bwd, permute bwd moves R + P; the weighted unpermute bwd also reads the
permuted rows (+P). Achieved bandwidth = bytes / best time of the rounds. The copy reference is ``dst.copy_(src)``
of a P-sized buffer into an existing one (2P bytes), three times per round in the same rounds;
the best of them is the denominator of that shape's percentages.
Memory (CPU): "fresh" as in a plain process (glibc maps every tensor over 32 MiB anew, so the
op that first writes it also pays the page faults and the kernel's zeroing); "reuse" keeps freed
memory in the heap (what a caching allocator does), which isolates the ops' own bandwidth.

    python benchmarks/permute_bench.py                    # ~3 min on 2 cores
    python benchmarks/permute_bench.py --grid full --impls custom megatron
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (tokens, hidden, experts, topk): the headline shape of the issue, then the range it names.
HEADLINE = (16384, 1280, 16, 4)
DEFAULT_EXTRA = [(4096, 2048, 64, 6), (32768, 2048, 16, 2), (65536, 1280, 64, 2)]


@dataclass(frozen=True)
class Config:
    tokens: int
    hidden: int
    experts: int
    topk: int
    dtype: str
    mode: str

    def row(self) -> str:
        return f"{self.tokens} | {self.hidden} | {self.experts} | {self.topk} | {self.dtype} | {self.mode}"

    def bytes_moved(self) -> int:
        size = torch.tensor([], dtype=DTYPES[self.dtype]).element_size()
        r = self.tokens * self.hidden * size
        p = r * self.topk
        return 4 * (r + p) + (p if self.mode == "weighted" else 0)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=("default", "full"), default="default",
                   help="default: the headline shape 16k/h1280/E16/top-4 for every dtype and mode, "
                        "plus 3 shapes in bf16; full: tokens 4k-64k x hidden 1280/2048 x experts "
                        "16/64 x top-k 2/4/6 (use with --dtypes/--modes to bound it)")
    p.add_argument("--tokens", type=int, nargs="+", help="override the grid's token counts")
    p.add_argument("--hidden", type=int, nargs="+", help="override the grid's hidden sizes")
    p.add_argument("--experts", type=int, nargs="+", help="override the grid's expert counts")
    p.add_argument("--topk", type=int, nargs="+", help="override the grid's top-k values")
    p.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    p.add_argument("--modes", nargs="+", choices=("dispatch", "weighted"),
                   default=["dispatch", "weighted"])
    p.add_argument("--impls", nargs="+", default=["custom", "megatron", "reference"],
                   choices=("custom", "megatron", "reference", "te-fused"))
    p.add_argument("--rounds", type=int, default=4,
                   help="timed rounds (implementations interleaved); the best round is reported")
    p.add_argument("--memory", nargs="+", choices=("fresh", "reuse"), default=["fresh", "reuse"],
                   help="CPU: fresh = glibc maps every large tensor anew (first-touch page "
                        "faults inside the ops, as in a plain training process); reuse = freed "
                        "memory is reused (the ops' own bandwidth)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--max-gb", type=float, default=8.0,
                   help="skip shapes whose tensors exceed this many GB (P-sized tensors x 6)")
    return p.parse_args()


def configs(args: argparse.Namespace) -> list[Config]:
    if args.grid == "full" or any((args.tokens, args.hidden, args.experts, args.topk)):
        shapes = itertools.product(args.tokens or [4096, 16384, 32768, 65536],
                                   args.hidden or [1280, 2048], args.experts or [16, 64],
                                   args.topk or [2, 4, 6])
        return [Config(*s, d, m) for s in shapes for d in args.dtypes for m in args.modes]
    out = [Config(*HEADLINE, d, m) for d in args.dtypes for m in args.modes]
    extra_dtype = "bf16" if "bf16" in args.dtypes else args.dtypes[0]
    return out + [Config(*s, extra_dtype, "dispatch") for s in DEFAULT_EXTRA]


def implementations(names: list[str]) -> dict:
    from megatron.core.transformer.moe import moe_utils

    from megatron_pathmoe.ops import permutation, reference

    class TeFused:  # megatron-core's fused path: transformer-engine kernels
        @staticmethod
        def permute(*a, **k):
            return moe_utils.permute(*a, **k, fused=True)

        @staticmethod
        def unpermute(*a, **k):
            return moe_utils.unpermute(*a, **k, fused=True)

    table = {"custom": permutation, "megatron": moe_utils, "reference": reference,
             "te-fused": TeFused}
    return {name: table[name] for name in names}


def inputs(cfg: Config, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(cfg.tokens, cfg.experts, generator=g)
    routing_map = torch.zeros(cfg.tokens, cfg.experts, dtype=torch.bool)
    routing_map.scatter_(1, logits.topk(cfg.topk, dim=1).indices, True)
    probs = torch.softmax(logits, -1) * routing_map
    x = torch.randn(cfg.tokens, cfg.hidden, generator=g).to(DTYPES[cfg.dtype])
    grad = torch.randn(cfg.tokens, cfg.hidden, generator=g).to(DTYPES[cfg.dtype])
    return [t.to(device) for t in (x, routing_map, probs, grad)]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fwd_bwd(impl, cfg: Config, x, routing_map, probs, grad) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    weighted = cfg.mode == "weighted"
    probs = probs.detach().requires_grad_(weighted)
    permuted, _, sorted_indices = impl.permute(x, routing_map, probs=probs)
    out = impl.unpermute(permuted, sorted_indices, x.shape, probs=probs if weighted else None,
                         routing_map=routing_map if weighted else None)
    out.backward(grad)
    return x.grad


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


class Malloc:
    """glibc's treatment of large blocks. "fresh" (the default): every tensor over 32 MiB is a
    new mmap, whose first touch page-faults (and the kernel zeroes it) inside whichever op writes
    it first. "reuse": freed memory stays in the heap and is handed out again, as a caching
    allocator would, so the timings show the ops' own bandwidth."""

    M_TRIM_THRESHOLD, M_MMAP_MAX, DEFAULT_MMAP_MAX = -1, -4, 65536

    def __init__(self):
        import ctypes

        try:
            self.libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self.libc = None

    @property
    def available(self) -> bool:
        return self.libc is not None

    def set(self, mode: str) -> None:
        reuse = mode == "reuse"
        self.libc.mallopt(self.M_MMAP_MAX, 0 if reuse else self.DEFAULT_MMAP_MAX)
        self.libc.mallopt(self.M_TRIM_THRESHOLD, 2**31 - 1 if reuse else 128 * 1024)


def run_config(cfg: Config, impls: dict, rounds: int, device: str, malloc: Malloc | None,
               alloc: str) -> dict:
    if malloc is not None:
        malloc.set(alloc)
    x, routing_map, probs, grad = inputs(cfg, device)
    src = torch.randn(cfg.tokens * cfg.topk, cfg.hidden, device=device).to(DTYPES[cfg.dtype])
    dst = torch.empty_like(src).copy_(src)  # touched: the copy measures bandwidth only
    # One untimed pass per implementation (warm-up, and the gradients to compare).
    results = {name: fwd_bwd(impl, cfg, x, routing_map, probs, grad) for name, impl in impls.items()}
    baseline = results.get("megatron", next(iter(results.values()))).float()
    diffs = {n: (g.float() - baseline).abs().max().item() for n, g in results.items()}
    del results
    times = {name: [] for name in impls}
    copies = []
    for r in range(rounds):
        order = list(impls.items())
        order = order[r % len(order):] + order[:r % len(order)]  # rotate who runs first
        copies += [timed(lambda: dst.copy_(src), device) for _ in range(3)]
        for name, impl in order:
            times[name].append(timed(lambda: fwd_bwd(impl, cfg, x, routing_map, probs, grad),
                                     device))
    # Best of the rounds: on a shared machine the fastest round is the least disturbed one.
    copy_bw = 2 * src.numel() * src.element_size() / min(copies)
    return {"copy_bw": copy_bw, "diffs": diffs, "times": {n: min(t) for n, t in times.items()}}


def too_big(cfg: Config, max_gb: float) -> bool:
    size = torch.tensor([], dtype=DTYPES[cfg.dtype]).element_size()
    return 6 * cfg.tokens * cfg.topk * cfg.hidden * max(size, 4) > max_gb * 1e9


def print_table(rows: list[tuple[Config, str, dict]], impls: list[str]) -> None:
    print("\n| tokens | hidden | experts | top-k | dtype | mode | memory | copy GB/s | "
          + " | ".join(f"{n} ms | {n} % copy" for n in impls)
          + " | custom speed-up vs megatron | max abs diff of grad vs megatron |")
    print("|" + "---|" * (8 + 2 * len(impls) + 2))
    for cfg, alloc, res in rows:
        cells = []
        for name in impls:
            t = res["times"][name]
            cells += [f"{t * 1e3:.1f}", f"{cfg.bytes_moved() / t / res['copy_bw'] * 100:.0f}%"]
        speedup = (f"{res['times']['megatron'] / res['times']['custom']:.2f}x"
                   if {"custom", "megatron"} <= set(impls) else "-")
        diff = max((d for n, d in res["diffs"].items() if n != "megatron"), default=0.0)
        print(f"| {cfg.row()} | {alloc} | {res['copy_bw'] / 1e9:.1f} | " + " | ".join(cells)
              + f" | {speedup} | {diff:.1e} |")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    isa = ""
    if args.device == "cpu":
        from megatron_pathmoe.ops import load_extension

        extension = load_extension()
        if "custom" in args.impls and not extension.supports("cpu"):
            sys.exit(f"custom ops unavailable: {extension.reason}")
        isa = f", custom row kernels: {extension.module.cpu.isa()}" if extension.module else ""
    malloc = Malloc() if args.device == "cpu" else None
    allocs = args.memory if malloc is not None and malloc.available else ["fresh"]
    impls = implementations(args.impls)
    plan = [c for c in configs(args) if not too_big(c, args.max_gb)]
    skipped = len(configs(args)) - len(plan)
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} "
          f"cpus, torch {torch.__version__}, {torch.get_num_threads()} threads, device "
          f"{args.device}{isa}; best of {args.rounds} rounds; {len(plan)} shapes"
          + (f" ({skipped} over --max-gb skipped)" if skipped else ""))
    rows = []
    for cfg, alloc in tqdm([(c, a) for c in plan for a in allocs], desc="shapes",
                           file=sys.stderr):
        rows.append((cfg, alloc, run_config(cfg, impls, args.rounds, args.device, malloc, alloc)))
    print_table(rows, list(impls))


if __name__ == "__main__":
    main()
