"""tools/plot_metrics.py on two synthetic runs (one of them two seeds) writes its PNGs."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from megatron_pathmoe.monitoring import Monitor, MonitoringConfig
from megatron_pathmoe.monitoring.plots import parse_runs, series

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYERS, EXPERTS = 4, 8


def synthetic_run(run_dir: str, floor: float, imbalance: float, seed: int) -> None:
    """A run's metrics.jsonl: decaying noisy loss, validation every 50 iterations,
    expert load drifting towards balance (deeper layers less balanced)."""
    g = torch.Generator().manual_seed(seed)
    monitor = Monitor.from_config(MonitoringConfig(), run_dir, writer=True)
    for iteration in range(5, 401, 5):
        loss = floor + 6.0 * math.exp(-iteration / 60) + 0.05 * float(torch.randn(1, generator=g))
        spread = imbalance * (1 + torch.arange(LAYERS)[:, None]) * math.exp(-iteration / 200)
        load = 1 + spread * torch.linspace(-1, 1, EXPERTS)
        entropy = math.log(EXPERTS) * (0.6 + 0.35 * (1 - math.exp(-iteration / 100))
                                       - 0.05 * torch.arange(LAYERS).double())
        monitor.write(iteration, {"lm loss": loss, "tokens-per-second": 9000 + 100 * seed},
                      consumed_samples=16 * iteration, expert_load=load,
                      routing_entropy=entropy)
        if iteration % 50 == 0:
            monitor.write(iteration, {"lm loss validation ppl": math.exp(loss + 0.1)},
                          consumed_samples=16 * iteration)
    monitor.close()


def test_plot_metrics_tool_on_two_runs(tmp_path):
    for name, floor, imbalance, seed in (("path_s1", 3.0, 0.05, 1), ("path_s2", 3.1, 0.05, 2),
                                         ("indep", 3.3, 0.15, 3)):
        synthetic_run(str(tmp_path / name), floor, imbalance, seed)
    out = tmp_path / "plots"
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "plot_metrics.py"),
         f"PathB4={tmp_path / 'path_s1'}", f"PathB4={tmp_path / 'path_s2'}",
         f"Indep={tmp_path / 'indep'}", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr
    written = done.stdout.split()
    assert [os.path.basename(p) for p in written] == [
        "loss.png", "valid_perplexity.png", "tokens_per_second.png", "expert_load_entropy.png"]
    for path in written:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 10_000


def test_seeds_are_averaged_and_bad_runs_named(tmp_path):
    synthetic_run(str(tmp_path / "a"), 3.0, 0.1, 1)
    synthetic_run(str(tmp_path / "b"), 3.0, 0.1, 2)
    runs = parse_runs([f"X={tmp_path / 'a'}", f"X={tmp_path / 'b'}"])
    x, mean = series(runs["X"], "tokens-per-second")
    assert len(x) == 80 and mean[0] == pytest.approx(9150)
    with pytest.raises(SystemExit, match="nowhere: no nowhere/metrics.jsonl"):
        parse_runs(["nowhere"])
