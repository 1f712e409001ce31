"""--timing-log-level / --timing-log-option: megatron-core's own Timers on the model and
optimizer configs, logged each log interval and written to metrics.jsonl and TensorBoard.
Real 2-rank gloo runs, pipeline parallel so that megatron's p2p timers run too (level 2
minmax, level 1 all), and RunTimers in-process (max, pausing, level 0)."""

from __future__ import annotations

import argparse
import re
import time
from types import SimpleNamespace

import pytest
import torch

from megatron_pathmoe.config import ConfigError
from megatron_pathmoe.monitoring import (
    MonitoringConfig,
    RunTimers,
    add_monitoring_args,
    read_metrics,
    timers_paused,
)
from tests.conftest import run_cli
from tests.monitoring.test_pretrain_monitoring import MODEL, _data

LEVEL1 = {"forward-backward", "all-grads-sync", "optimizer-inner-step", "optimizer"}
LEVEL2 = {"forward-compute", "backward-compute", "batch-generator", "moe-permute",
          "moe-unpermute", "forward-recv", "forward-send", "backward-recv", "backward-send",
          "forward-send-backward-recv", "backward-send-forward-recv"}
# (inner, outer): on every rank the inner timer runs inside the outer one.
NESTED = [("forward-compute", "forward-backward"), ("backward-compute", "forward-backward"),
          ("all-grads-sync", "forward-backward"), ("batch-generator", "forward-compute"),
          ("moe-permute", "forward-compute"), ("optimizer-inner-step", "optimizer"),
          ("backward-send-forward-recv", "forward-backward")]
ITER_MS = re.compile(r"iter +(\d+)/\d+ \|.* \| ([\d,]+) ms/iter")
TIMER_LINE = re.compile(r"^ +(\S+) \.+: (.*)$")


def _timed_run(root, demo_data, *timing: str) -> dict:
    """4 iterations on 2 ranks (PP2: 1F1B over 4 micro-batches), a log and a validation
    every 2."""
    result = run_cli(["-m", "megatron_pathmoe.training.pretrain", *MODEL, *_data(demo_data),
                      "--train-iters", "4", "--log-interval", "2", "--eval-interval", "2",
                      "--pipeline-model-parallel-size", "2",
                      "--summary-json", str(root / "summary.json"), *timing],
                     nproc=2, timeout=500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"root": root, "stdout": result.stdout,
            "records": {r["iteration"]: r for r in read_metrics(str(root))}}


@pytest.fixture(scope="module")
def level2_minmax(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("timers_l2")
    return _timed_run(root, demo_data, "--timing-log-level", "2", "--timing-log-option",
                      "minmax", "--tensorboard-dir", str(root / "tb"),
                      "--log-timers-to-tensorboard")


@pytest.fixture(scope="module")
def level1_all(demo_data, tmp_path_factory):
    return _timed_run(tmp_path_factory.mktemp("timers_l1"), demo_data, "--timing-log-level",
                      "1", "--timing-log-option", "all")


def _blocks(stdout: str, header: str) -> list[list[str]]:
    """The lines of each timer block the log printed (after ``header``)."""
    blocks, current = [], None
    for line in stdout.splitlines():
        if line.strip() == header:
            current = []
            blocks.append(current)
        elif current is not None and line.startswith("      "):
            current.append(line)
        else:
            current = None
    return blocks


def _minmax(block: list[str]) -> dict[str, tuple[float, float]]:
    found = {}
    for line in block:
        name, values = TIMER_LINE.match(line).groups()
        low, high = (float(v) for v in values.strip("()").split(","))
        found[name] = (low, high)
    return found


def test_level2_minmax_logs_plausible_megatron_timers(level2_minmax):
    blocks = [_minmax(b) for b in _blocks(level2_minmax["stdout"],
                                          "(min, max) time across ranks (ms):")]
    iter_ms = {int(m[1]): float(m[2].replace(",", ""))
               for m in ITER_MS.finditer(level2_minmax["stdout"])}
    assert len(blocks) == 2 and sorted(iter_ms) == [2, 4]
    for (iteration, ms), timers in zip(sorted(iter_ms.items()), blocks):
        assert LEVEL1 | LEVEL2 <= set(timers), LEVEL1 | LEVEL2 - set(timers)
        assert all(0 <= low <= high for low, high in timers.values()), timers
        assert all(timers[name][1] > 0 for name in LEVEL1 | LEVEL2), timers  # 2 decimals
        for inner, outer in NESTED:
            assert timers[inner][1] <= timers[outer][1], (inner, outer, timers)
        assert timers["forward-backward"][1] + timers["optimizer"][0] <= ms, (ms, timers)
        record = level2_minmax["records"][iteration]
        for name, (_, high) in timers.items():  # the log: ms per iteration, 2 decimals
            assert abs(1000 * record[f"{name}-time"] - high) <= 0.006, name
        assert record["forward-backward-time"] <= record["iteration-time"]


def test_timers_reach_tensorboard_with_the_streamed_values(level2_minmax):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(level2_minmax["root"] / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = {t for t in events.Tags()["scalars"] if t.endswith("-time")}
    assert {f"{name}-time" for name in LEVEL1 | LEVEL2} | {"iteration-time"} <= tags
    for tag in tags:
        points = {e.step: e.value for e in events.Scalars(tag)}
        assert sorted(points) == [2, 4], tag
        for it, value in points.items():
            assert value == pytest.approx(level2_minmax["records"][it][tag], rel=1e-6), tag


def test_level1_all_reports_every_rank_and_no_level2_timer(level1_all, level2_minmax):
    stdout = level1_all["stdout"]
    blocks = _blocks(stdout, "times across ranks (ms):")
    assert len(blocks) == 2 and "(min, max)" not in stdout
    for block in blocks:
        names = [line.strip().rstrip(":") for line in block if not line.strip()
                 .startswith("rank")]
        ranks = [line.split()[1] for line in block if line.strip().startswith("rank")]
        assert LEVEL1 <= set(names) and not LEVEL2 & set(names), names
        assert ranks == ["0:", "1:"] * len(names)
    records = level1_all["records"]
    assert not any(f"{n}-time" in records[4] for n in LEVEL2)
    # Timers observe, never change the numbers: the same losses as the level-2 run.
    for it in (2, 4):
        assert records[it]["lm loss"] == level2_minmax["records"][it]["lm loss"]
        assert records[it]["lm loss validation"] == \
            level2_minmax["records"][it]["lm loss validation"]


# ------------------------------------------------------------------ in process


def _chunks_and_optimizer():
    def config():
        return SimpleNamespace(timers=None, barrier_with_L1_time=True)

    return [SimpleNamespace(config=config())], SimpleNamespace(config=config())


def _permute_once() -> None:
    from megatron.core.transformer.moe import token_dispatcher

    routing_map = torch.tensor([[True, False], [False, True], [True, True]])
    token_dispatcher.permute(torch.randn(3, 4), routing_map)


def test_level0_creates_no_timers():
    from megatron.core.transformer.moe import token_dispatcher

    chunks, optimizer = _chunks_and_optimizer()
    permute = token_dispatcher.permute
    assert RunTimers.from_config(MonitoringConfig(), chunks, optimizer) is None
    assert chunks[0].config.timers is None and optimizer.config.timers is None
    assert token_dispatcher.permute is permute


def test_run_timers_max_option_pause_and_close(megatron_world1):
    from megatron.core.transformer.moe import token_dispatcher

    from megatron_pathmoe.ops import installed_permute_impl

    chunks, optimizer = _chunks_and_optimizer()
    permute, impl = token_dispatcher.permute, installed_permute_impl()
    cfg = MonitoringConfig(timing_log_level=2, timing_log_option="max",
                           barrier_with_L1_time=False)
    timers = RunTimers.from_config(cfg, chunks, optimizer)
    try:
        assert chunks[0].config.timers is optimizer.config.timers is timers.timers
        assert not chunks[0].config.barrier_with_L1_time
        assert token_dispatcher.permute is not permute and installed_permute_impl() == impl
        _permute_once()
        permuted = timers.timers._timers["moe-permute"].elapsed(reset=False)
        timers.timers("optimizer", log_level=1).start()
        time.sleep(0.02)
        timers.timers("optimizer").stop()
        with timers_paused(chunks):  # evaluation: nothing is timed
            assert chunks[0].config.timers is None
            _permute_once()
        assert chunks[0].config.timers is timers.timers
        assert timers.timers._timers["moe-permute"].elapsed(reset=False) == permuted > 0
        scalars, text = timers.pop(iterations=2)
        assert set(scalars) == {"moe-permute-time", "optimizer-time"}
        assert scalars["moe-permute-time"] == pytest.approx(permuted / 2)
        assert 0.01 <= scalars["optimizer-time"] < 0.5
        assert text.startswith("max time across ranks (ms):") and "optimizer ..." in text
        assert timers.pop(iterations=2) == ({}, None)  # reset by the previous pop
    finally:
        timers.close()
    assert chunks[0].config.timers is None and optimizer.config.timers is None
    assert token_dispatcher.permute is permute


def test_bad_timing_flags_are_one_line_errors():
    parser = add_monitoring_args(argparse.ArgumentParser())
    for argv in (["--timing-log-level", "3"], ["--timing-log-option", "sum"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    with pytest.raises(ConfigError, match="--timing-log-option must be one of"):
        MonitoringConfig(timing_log_option="sum").validate()
    with pytest.raises(ConfigError, match="--timing-log-level must be 0, 1 or 2"):
        MonitoringConfig(timing_log_level=-1).validate()
    assert (MonitoringConfig().timing_log_level, MonitoringConfig().timing_log_option) == \
        (0, "minmax")  # Megatron-LM's defaults
