"""One command serves the first launch and every requeue: `--save X --load X` with nothing in
X trains from scratch (one warning, as Megatron-LM); killed (SIGKILL) mid-run and relaunched
with the same command, it resumes from the newest complete checkpoint, bitwise."""

from __future__ import annotations

import pytest

from megatron_pathmoe.checkpoint import (
    TRACKER_FILE,
    CheckpointError,
    find_checkpoint,
    read_tracker,
)
from tests.training.cluster_runs import (
    data_args,
    kill_session,
    launch,
    read_until,
    run,
    summary,
)

ITERS = 6
WARNING = "no checkpoint in {}, training from scratch"


def _job(demo_data, ckpt, summary_path) -> list[str]:
    """The job script's one command line."""
    return [*data_args(demo_data), "--train-iters", str(ITERS), "--save", str(ckpt),
            "--load", str(ckpt), "--save-interval", "2", "--summary-json", str(summary_path)]


@pytest.fixture(scope="module")
def first_launch(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("requeue")
    ckpt = root / "ckpt"  # does not exist yet
    out = run(_job(demo_data, ckpt, root / "s.json"))
    return {"out": out, "ckpt": ckpt, "summary": summary(root / "s.json")}


def test_first_launch_with_empty_load_trains_from_scratch(first_launch):
    out, ckpt = first_launch["out"], first_launch["ckpt"]
    assert out.count(WARNING.format(ckpt)) == 1  # one line for the job, not one per rank
    assert "resumed from" not in out
    assert first_launch["summary"]["start_iteration"] == 0
    assert len(first_launch["summary"]["train_losses"]) == ITERS
    assert read_tracker(str(ckpt)) == ITERS


def test_killed_job_relaunched_with_the_same_command_resumes(demo_data, first_launch, tmp_path):
    ckpt, s = tmp_path / "ckpt", tmp_path / "s.json"
    proc = launch(_job(demo_data, ckpt, s))
    read_until(proc, r"iter +3/")  # the save at iteration 2 is complete
    kill_session(proc)
    assert find_checkpoint(str(ckpt)) == str(ckpt / "iter_0000002")
    out = run(_job(demo_data, ckpt, s))
    assert f"resumed from {ckpt}/iter_0000002" in out and "training from scratch" not in out
    resumed = summary(s)
    assert resumed["start_iteration"] == 2
    assert resumed["train_losses"] == first_launch["summary"]["train_losses"][2:]
    assert resumed["valid_loss"] == first_launch["summary"]["valid_loss"]
    assert read_tracker(str(ckpt)) == ITERS


def test_what_counts_as_no_checkpoint_yet(tmp_path):
    """Missing, empty, or only an interrupted first save: start from scratch. A damaged
    checkpoint is refused instead (training over it would lose the run)."""
    assert find_checkpoint(str(tmp_path / "missing")) is None
    assert find_checkpoint(str(tmp_path)) is None
    (tmp_path / ".tmp_iter_0000002").mkdir()  # killed during its first save
    assert find_checkpoint(str(tmp_path)) is None
    (tmp_path / TRACKER_FILE).write_text("2\n")  # names a checkpoint that is not there
    with pytest.raises(CheckpointError, match="missing or incomplete"):
        find_checkpoint(str(tmp_path))


def test_damaged_load_is_refused_before_launch(demo_data, tmp_path):
    from megatron_pathmoe.training.arguments import parse_args

    (tmp_path / TRACKER_FILE).write_text("oops\n")
    with pytest.raises(SystemExit) as exc:
        parse_args(["--device", "cpu", *data_args(demo_data), "--load", str(tmp_path)])
    assert exc.value.code == 2
