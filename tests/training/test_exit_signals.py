"""Graceful exits at world 2 through torchrun over gloo: SIGTERM (--exit-signal-handler),
--exit-duration-in-mins and --exit-interval each save at the iteration they stop after and
exit 0, and the resumed run's losses are bitwise those of an uninterrupted run."""

from __future__ import annotations

import os
import signal

import pytest

from megatron_pathmoe.checkpoint import read_tracker
from tests.training.cluster_runs import (
    data_args,
    launch,
    read_until,
    run,
    summary,
    worker_pids,
)

ITERS = 12


def _args(demo_data, summary_path, *extra) -> list[str]:
    return [*data_args(demo_data), "--train-iters", str(ITERS), "--summary-json",
            str(summary_path), *extra]


@pytest.fixture(scope="module")
def reference(demo_data, tmp_path_factory):
    """The uninterrupted world-2 run."""
    path = tmp_path_factory.mktemp("exit_reference") / "s.json"
    run(_args(demo_data, path), nproc=2)
    return summary(path)


def _check_resume(demo_data, tmp_path, ckpt, reference, stopped_at: int) -> None:
    """Relaunched from the exit's checkpoint, the run finishes like the uninterrupted one."""
    resumed = tmp_path / "resumed.json"
    out = run(_args(demo_data, resumed, "--load", str(ckpt), "--save", str(ckpt)), nproc=2)
    assert f"resumed from {ckpt}/iter_{stopped_at:07d}" in out
    done = summary(resumed)
    assert done["start_iteration"] == stopped_at and done["exit_reason"] is None
    assert done["train_losses"] == reference["train_losses"][stopped_at:]
    assert done["grad_norms"] == reference["grad_norms"][stopped_at:]
    assert done["valid_loss"] == reference["valid_loss"]


def _stopped(part: dict, ckpt) -> int:
    """The iteration the early exit saved at: its last trained iteration."""
    stopped_at = len(part["train_losses"])
    assert read_tracker(str(ckpt)) == stopped_at
    assert part["valid_loss"] is None  # no final validation after an early exit
    return stopped_at


@pytest.mark.parametrize("target", ["rank1", "slurm"])
def test_sigterm_saves_current_iteration_and_resumes_bitwise(demo_data, reference, tmp_path,
                                                            target):
    """SIGTERM during a step to one worker, or as SLURM sends it to every process of the job
    step (torchrun, which forwards it to its workers too, the workers, their DataLoader
    workers): all ranks stop after the same step, save it and exit 0. torchrun itself reports
    a signal it received with exit status 1."""
    import psutil

    ckpt, part = tmp_path / "ckpt", tmp_path / "part.json"
    extra = ["--num-workers", "1"] if target == "slurm" else []
    proc = launch(_args(demo_data, part, "--save", str(ckpt), "--exit-signal-handler", *extra),
                  nproc=2)
    read_until(proc, r"iter +3/")
    workers = worker_pids(proc)
    assert sorted(workers) == [0, 1]
    everyone = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    targets = [workers[1]] if target == "rank1" else everyone
    assert target == "rank1" or len(targets) >= 5  # torchrun, 2 ranks, their data workers
    for pid in targets:
        os.kill(pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == (0 if target == "rank1" else 1), out[-4000:]
    assert "ChildFailedError" not in out  # every worker exited 0
    interrupted = summary(part)
    assert "SIGTERM" in interrupted["exit_reason"]
    stopped_at = _stopped(interrupted, ckpt)
    assert 3 <= stopped_at < ITERS and f"exiting at iteration {stopped_at}" in out
    assert interrupted["train_losses"] == reference["train_losses"][:stopped_at]
    _check_resume(demo_data, tmp_path, ckpt, reference, stopped_at)


def test_exit_duration_saves_and_resumes_bitwise(demo_data, reference, tmp_path):
    """A budget shorter than one step: every rank agrees to stop after the first one."""
    ckpt, part = tmp_path / "ckpt", tmp_path / "part.json"
    run(_args(demo_data, part, "--save", str(ckpt), "--exit-duration-in-mins", "0.0001"),
        nproc=2)
    interrupted = summary(part)
    assert "--exit-duration-in-mins" in interrupted["exit_reason"]
    assert _stopped(interrupted, ckpt) == 1
    assert interrupted["train_losses"] == reference["train_losses"][:1]
    _check_resume(demo_data, tmp_path, ckpt, reference, 1)


def test_exit_interval_saves_and_exits(demo_data, reference, tmp_path):
    ckpt, part = tmp_path / "ckpt", tmp_path / "part.json"
    run(_args(demo_data, part, "--save", str(ckpt), "--exit-interval", "5"), nproc=2)
    interrupted = summary(part)
    assert "--exit-interval 5" in interrupted["exit_reason"]
    assert _stopped(interrupted, ckpt) == 5
    assert interrupted["train_losses"] == reference["train_losses"][:5]
