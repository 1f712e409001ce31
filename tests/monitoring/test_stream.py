"""metrics.jsonl: survives a SIGKILL mid-stream, resumes without repeating or losing lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_pathmoe.monitoring.stream import (
    MetricsStream,
    MetricsStreamError,
    read_metrics,
    truncate_after,
)

WRITER = """
import sys
from megatron_pathmoe.monitoring.stream import MetricsStream
stream = MetricsStream(sys.argv[1])
iteration = 0
while True:
    iteration += 1
    stream.write(iteration, {"lm loss": 10.0 / iteration, "grad-norm": float("nan")},
                 consumed_samples=8 * iteration)
"""


def _killed_stream(path: str, min_lines: int = 30) -> None:
    """A writer subprocess appending as fast as it can, SIGKILLed mid-stream."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, path])
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if os.path.exists(path) and open(path, "rb").read().count(b"\n") >= min_lines:
                break
            time.sleep(0.05)
        else:
            pytest.fail("writer produced too few lines")
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()


def test_sigkill_then_resume(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    _killed_stream(path)
    lines = open(path, "rb").read().split(b"\n")
    complete = [json.loads(line) for line in lines[:-1]]  # every terminated line parses
    assert [r["iteration"] for r in complete] == list(range(1, len(complete) + 1))
    assert complete[0]["grad-norm"] is None and complete[0]["consumed_samples"] == 8
    # A kill in the middle of a line (simulated: the write syscall rarely tears) is repaired.
    with open(path, "ab") as f:
        f.write(b'{"iteration": 99999, "lm lo')
    resumed = len(complete) // 2
    before = open(path, "rb").read()
    notes: list[str] = []
    stream = MetricsStream(path, resume_iteration=resumed, log=notes.append)
    kept = open(path, "rb").read()
    assert before.startswith(kept) and kept.count(b"\n") == resumed  # a prefix, none lost
    assert any("torn" in n for n in notes) and any("dropped" in n for n in notes)
    for iteration in range(resumed + 1, resumed + 6):
        stream.write(iteration, {"lm loss": 1.0}, consumed_samples=8 * iteration)
    stream.close()
    records = read_metrics(str(tmp_path))
    assert [r["iteration"] for r in records] == list(range(1, resumed + 6))
    assert records[resumed - 1]["lm loss"] == pytest.approx(10.0 / resumed)


def test_same_iteration_lines_merge_and_order_is_enforced(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    stream = MetricsStream(path)
    stream.write(10, {"lm loss": 2.0}, consumed_samples=80)
    stream.write(10, {"lm loss validation": 2.5}, consumed_samples=80)
    with pytest.raises(MetricsStreamError, match="iteration 5 written after 10"):
        stream.write(5, {}, consumed_samples=40)
    stream.close()
    (record,) = read_metrics(path)
    assert record["lm loss"] == 2.0 and record["lm loss validation"] == 2.5


def test_fresh_run_starts_a_new_curve_and_corruption_is_named(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    stream = MetricsStream(path)
    stream.write(1, {"lm loss": 1.0}, consumed_samples=1)
    stream.close()
    assert truncate_after(path, 0, log=lambda _: None) == 0 and os.path.getsize(path) == 0
    with open(path, "w") as f:
        f.write('garbage\n{"iteration": 1}\n')
    with pytest.raises(MetricsStreamError, match=r"metrics.jsonl:1: not a JSON metrics line"):
        MetricsStream(path, resume_iteration=1)
