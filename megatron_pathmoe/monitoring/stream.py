"""The metrics stream: one JSON line per log interval in ``<run dir>/metrics.jsonl``.

Each line is ``{"iteration": N, "consumed_samples": S, "wall_time": unix seconds, <scalar>:
value, ...}``, appended, flushed and fsynced before ``write`` returns, so a run killed at any
point keeps its curve up to its last log interval. Opening the stream repairs what a kill can
leave (a torn last line, discarded with a note) and, on resume, truncates the lines after the
checkpoint's iteration so the resumed run repeats no iteration. Several lines may share one
iteration (a validation written after that iteration's training log); ``read_metrics`` merges
them.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Callable, Mapping

METRICS_FILE = "metrics.jsonl"


class MetricsStreamError(ValueError):
    """A metrics.jsonl that cannot be continued; the message names the file and line."""


class MetricsStream:
    """Appends metric lines to ``path``; see the module docstring for the format."""

    def __init__(self, path: str, resume_iteration: int = 0,
                 log: Callable[[str], None] = print) -> None:
        """Open ``path`` for appending after keeping only the lines with iteration <=
        ``resume_iteration`` (the checkpoint's iteration; 0 for a fresh run)."""
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.last_iteration = truncate_after(path, resume_iteration, log)
        self._file = open(path, "a", encoding="utf-8")

    def write(self, iteration: int, scalars: Mapping[str, float], consumed_samples: int
              ) -> None:
        """Append one line and make it durable (flush + fsync)."""
        if iteration < self.last_iteration:
            raise MetricsStreamError(
                f"{self.path}: iteration {iteration} written after {self.last_iteration}; "
                "open the stream with the resumed iteration")
        record: dict[str, Any] = {"iteration": int(iteration),
                                  "consumed_samples": int(consumed_samples),
                                  "wall_time": time.time()}
        record.update((name, _json_number(value)) for name, value in scalars.items())
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.last_iteration = iteration

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def _json_number(value: float) -> float | None:
    """JSON has no NaN/inf: they become null (a skipped step's grad norm is NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


def truncate_after(path: str, iteration: int, log: Callable[[str], None] = print) -> int:
    """Cut ``path`` after its last complete line with iteration <= ``iteration``, in place
    (lines before it are never rewritten); a torn last line (a kill mid-write) is dropped with
    a note. Returns the last kept iteration (0 if none). A missing file is fine."""
    if not os.path.exists(path):
        return 0
    keep, last, dropped, torn = 0, 0, 0, False
    with open(path, "rb") as f:
        data = f.read()
    offset = 0
    for number, raw in enumerate(data.splitlines(keepends=True), start=1):
        record = _parse(raw)
        if record is None:
            if offset + len(raw) < len(data):
                raise MetricsStreamError(
                    f"{path}:{number}: not a JSON metrics line (only the last line may be torn "
                    "by a kill); move the file aside to start a new stream")
            torn = True
        elif record["iteration"] <= iteration:
            keep, last = offset + len(raw), record["iteration"]
        else:
            dropped += 1
        offset += len(raw)
    if keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    if torn:
        log(f"{path}: discarded a torn last line (the run was killed while writing it)")
    if dropped:
        log(f"{path}: dropped {dropped} line(s) after iteration {iteration} (resumed run "
            "rewrites them)")
    return last


def _parse(raw: bytes) -> dict | None:
    if not raw.endswith(b"\n"):
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "iteration" in record else None


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (or of ``<dir>/metrics.jsonl``), one per iteration in
    order (lines of one iteration merged); a torn last line is ignored."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    merged: dict[int, dict[str, Any]] = {}
    with open(path, "rb") as f:
        for raw in f:
            record = _parse(raw)
            if record is not None:
                merged.setdefault(record["iteration"], {}).update(record)
    return [merged[i] for i in sorted(merged)]
