#!/usr/bin/env python
"""Per-step cost of the monitoring wiring on the README's tiny CPU run: the same pathmoe-pretrain
run with monitoring (metrics.jsonl, TensorBoard, --log-throughput, --log-memory) and without
(--no-metrics-stream, no sink), rounds interleaved (the order alternates), as subprocesses.

With ``--timing`` the variants are instead --timing-log-level 0, 1 and 2 (megatron-core's
timers; monitoring on in all three), and ``--timer-cost-only`` times one megatron Timer
start/stop pair and the level-2 permutation wrapper in-process.

Reported per variant (median over rounds): wall ms/iter over the log windows after the first
(each window also holds the previous log interval's writes) and the process's CPU seconds
(user + system, whole process: the same imports and setup in both), with ratios vs the first
variant ("off", or level 0).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device", "cpu", "--num-layers", "8", "--hidden-size", "128", "--num-attention-heads",
        "4", "--num-query-groups", "2", "--moe-ffn-hidden-size", "256", "--seq-length", "256",
        "--num-experts", "8", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "0",
        "--routing", "path", "--path-block-size", "4", "--micro-batch-size", "8",
        "--global-batch-size", "16", "--lr", "2e-3", "--min-lr", "2e-4",
        "--lr-warmup-iters", "5", "--eval-iters", "1"]
WINDOW = re.compile(r"iter +\d+/\d+ \|.* \| ([\d,]+) ms/iter")
MONITORING_ON = ["--log-throughput", "--log-memory"]  # + --tensorboard-dir in the run's dir
VARIANTS = {"off": ["--no-metrics-stream"], "on": MONITORING_ON}
TIMING_VARIANTS = {f"level {n}": [*MONITORING_ON, "--timing-log-level", str(n)]
                   for n in (0, 1, 2)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="interleaved on/off pairs")
    p.add_argument("--train-iters", type=int, default=40)
    p.add_argument("--log-interval", type=int, default=5,
                   help="iterations per log (and monitor write)")
    p.add_argument("--data-dir", default=os.path.join(REPO, "runs", "data"),
                   help="where the Shakespeare binaries are (built there when missing)")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS of the runs (1: fair on a loaded machine)")
    p.add_argument("--write-cost-only", action="store_true",
                   help="only time one log interval's monitoring work in this process")
    p.add_argument("--timing", action="store_true",
                   help="compare --timing-log-level 0/1/2 instead of monitoring off/on")
    p.add_argument("--timer-cost-only", action="store_true",
                   help="only time a megatron Timer start/stop pair and the level-2 "
                   "permutation wrapper in this process")
    return p.parse_args(argv)


def data_args(data_dir: str) -> list[str]:
    from megatron_pathmoe.data import prepare_demo_data

    prefix = os.path.join(data_dir, "shakespeare_train_text_document")
    if not os.path.exists(prefix + ".idx"):
        prepare_demo_data(data_dir)
    return ["--data-path", prefix, "--valid-data-path",
            os.path.join(data_dir, "shakespeare_valid_text_document"),
            "--tokenizer-model", os.path.join(REPO, "data", "shakespeare", "tokenizer.json")]


def run_once(extra: list[str], args: argparse.Namespace, data: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        if "--no-metrics-stream" not in extra:
            extra = [*extra, "--tensorboard-dir", os.path.join(tmp, "tb")]
        cmd = [sys.executable, "-m", "megatron_pathmoe.training.pretrain", *TINY, *data,
               "--train-iters", str(args.train_iters), "--log-interval", str(args.log_interval),
               "--summary-json", os.path.join(tmp, "summary.json"), *extra]
        env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=str(args.threads))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=REPO, env=env)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if status:
            sys.exit(f"pathmoe-pretrain failed:\n{out[-3000:]}")
    windows = [float(m[1].replace(",", "")) for m in WINDOW.finditer(out)][1:]
    return {"ms_per_iter": statistics.mean(windows), "cpu_s": usage.ru_utime + usage.ru_stime}


def timer_cost(calls: int = 20000, repeats: int = 5) -> dict[str, float]:
    """us per megatron Timer start/stop pair (no barrier; with the level-1 barrier, world-1
    gloo) and the level-2 permutation wrapper's own cost (around a no-op), on the CPU
    platform, where the timers' torch.cuda.synchronize is a no-op. Best of ``repeats``."""
    import time

    import torch.distributed as dist
    from megatron.core.timers import Timers

    from megatron_pathmoe.ops import dispatcher
    from megatron_pathmoe.platform import enable_cpu_platform

    enable_cpu_platform(force=True)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
    timers = Timers(2, "minmax")

    def per_call(fn, n: int = calls) -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            best = min(best, (time.perf_counter() - start) / n)
        return 1e6 * best

    def pair(barrier: bool):
        return lambda: (timers("t", 1).start(barrier=barrier), timers("t").stop())

    def noop():
        return None

    dispatcher._state["timing"] = type("Config", (), {"timers": timers})()
    try:
        wrapper = per_call(dispatcher._timed("moe-permute", noop)) - per_call(noop)
    finally:
        dispatcher._state["timing"] = None
    cost = {"pair_us": per_call(pair(False)), "pair_barrier_us": per_call(pair(True), calls // 10),
            "permute_wrapper_us": wrapper}
    dist.destroy_process_group()
    return cost


def compare(variants: dict[str, list[str]], args: argparse.Namespace) -> None:
    """Run the variants interleaved (order rotating each round) and print the medians."""
    data = data_args(args.data_dir)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            results[name].append(run_once(variants[name], args, data))
            print(f"round {r + 1} {name}: {results[name][-1]}", flush=True)
    med = {name: {k: statistics.median(x[k] for x in runs) for k in ("ms_per_iter", "cpu_s")}
           for name, runs in results.items()}
    base = med[names[0]]
    print(f"\n{args.rounds} rounds, {args.train_iters} iterations, a log every "
          f"{args.log_interval}; medians\n")
    print("| variant | wall ms/iter | ratio | process CPU s | ratio |\n|---|---:|---:|---:|---:|")
    for name, m in med.items():
        print(f"| {name} | {m['ms_per_iter']:.0f} | {m['ms_per_iter'] / base['ms_per_iter']:.3f} "
              f"| {m['cpu_s']:.1f} | {m['cpu_s'] / base['cpu_s']:.3f} |")


def write_cost(writes: int = 200) -> dict[str, float]:
    """ms (wall, CPU) of one log interval's monitoring work in this process, as the trainer does
    it for the tiny run (8 layers, 8 experts, blocks of 4): throughput and memory scalars, then
    one Monitor.write to metrics.jsonl and TensorBoard (histograms at their default interval)."""
    import time

    import torch

    from megatron_pathmoe.monitoring import (
        Monitor,
        MonitoringConfig,
        memory_scalars,
        throughput_scalars,
    )

    with tempfile.TemporaryDirectory() as tmp:
        cfg = MonitoringConfig(tensorboard_dir=os.path.join(tmp, "tb"))
        monitor = Monitor.from_config(cfg, tmp, router_block_size=4, writer=True)
        base = {"lm loss": 5.0, "grad-norm": 0.5, "learning-rate": 1e-3, "loss-scale": 1.0,
                "skipped-iterations": 0.0, "tokens-per-second": 2000.0, "iteration-time": 2.0,
                "world-size": 1.0}
        load, entropy = torch.rand(8, 8) * 2, torch.rand(8) * 2
        wall, cpu = time.perf_counter(), time.process_time()
        for it in range(1, writes + 1):
            scalars = base | throughput_scalars(1e12, 2.0, 1, None) | memory_scalars("cpu")
            monitor.write(it, scalars, consumed_samples=16 * it, expert_load=load,
                          routing_entropy=entropy)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        monitor.close()
    return {"wall_ms": 1000 * wall / writes, "cpu_ms": 1000 * cpu / writes}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_cost_only:
        print(f"one log interval's monitoring work: {write_cost()}")
        return 0
    if args.timer_cost_only:
        print(f"megatron timers, us per call: {timer_cost()}")
        return 0
    compare(TIMING_VARIANTS if args.timing else VARIANTS, args)
    print(f"one log interval's monitoring work: {write_cost()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
