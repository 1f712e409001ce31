"""pathmoe-pretrain wired to the monitoring package, checked on real tiny runs: TensorBoard
events and metrics.jsonl hold every scalar once per log interval with the values the log
printed, W&B's offline run the same history, the profiler trace the named ranges, and a
SIGKILLed run resumes its stream without repeating an iteration."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from megatron_pathmoe.monitoring import RANGES, read_metrics
from tests.conftest import REPO, run_cli

MODEL = ["--device", "cpu", "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads",
         "4", "--num-query-groups", "2", "--moe-ffn-hidden-size", "64", "--seq-length", "64",
         "--num-experts", "4", "--moe-router-topk", "2", "--micro-batch-size", "2",
         "--global-batch-size", "8", "--lr-warmup-iters", "1", "--eval-iters", "1",
         "--moe-aux-loss-coeff", "0.01", "--routing", "path", "--path-block-size", "2"]
TB_SWITCHES = ["--log-timers-to-tensorboard", "--log-validation-ppl-to-tensorboard",
               "--log-memory-to-tensorboard", "--log-world-size-to-tensorboard"]
ITER_LINE = re.compile(r"iter +(\d+)/\d+ \| loss ([\d.]+) \| (.*?) \| grad norm ([\d.]+) \| "
                       r"lr ([\d.e+-]+) \|")
VALID_LINE = re.compile(r"validation at iter (\d+): loss ([\d.]+) ppl")
FINAL_LINE = re.compile(r"validation: loss ([\d.]+) \| perplexity")


def _data(demo_data) -> list[str]:
    return ["--data-path", demo_data["train_prefix"], "--valid-data-path",
            demo_data["valid_prefix"], "--tokenizer-model", demo_data["tokenizer"]]


def _pretrain(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_pathmoe.training.pretrain", *MODEL, *args]


@pytest.fixture(scope="module")
def watched_run(demo_data, tmp_path_factory):
    """6 iterations, a log every 2, a validation at 4 and at the end, z-loss on, TensorBoard
    with every switch, throughput and memory, a profile of iteration 3, W&B offline when
    installed. Run dir: the --summary-json folder."""
    root = tmp_path_factory.mktemp("watched")
    wandb = importlib.util.find_spec("wandb") is not None
    extra = ["--wandb-project", "pathmoe-test", "--wandb-save-dir", str(root)] if wandb else []
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"} if wandb else {}
    os.environ.update(env)
    try:
        result = run_cli(_pretrain(*_data(demo_data), "--train-iters", "6", "--log-interval", "2",
                                   "--eval-interval", "4", "--moe-z-loss-coeff", "0.001",
                                   "--tensorboard-dir", str(root / "tb"), *TB_SWITCHES,
                                   "--log-throughput", "--log-memory", "--profile",
                                   "--profile-step-start", "3", "--profile-step-end", "4",
                                   "--summary-json", str(root / "summary.json"), *extra)[1:],
                         timeout=400)
    finally:
        for key in env:
            os.environ.pop(key)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"root": root, "stdout": result.stdout, "wandb": wandb}


def _logged(stdout: str) -> dict[int, dict[str, float]]:
    """What the log printed per log interval, and per validation."""
    logged: dict[int, dict[str, float]] = {}
    for m in ITER_LINE.finditer(stdout):
        aux = m[3].split()  # "name value name value" (megatron's tracker names)
        logged[int(m[1])] = {"lm loss": float(m[2]), "grad-norm": float(m[4]),
                             "learning-rate": float(m[5]),
                             **{k: float(v) for k, v in zip(aux[::2], aux[1::2])}}
        assert {"load_balancing_loss", "z_loss"} <= set(logged[int(m[1])]), m[0]
    for m in VALID_LINE.finditer(stdout):
        logged[int(m[1])]["lm loss validation"] = float(m[2])
    logged[max(logged)]["lm loss validation"] = float(FINAL_LINE.search(stdout)[1])
    return logged


def _expected_tags() -> set[str]:
    tags = {"lm loss", "load_balancing_loss", "z_loss", "grad-norm", "learning-rate",
            "loss-scale", "skipped-iterations", "tokens-per-second", "iteration-time",
            "throughput", "world-size", "mem-rss-bytes", "mem-max-rss-bytes",
            "lm loss validation", "lm loss validation ppl"}
    for unit, count in (("layer", 4), ("block", 2)):
        for i in range(1, count + 1):
            tags |= {f"moe/expert_load_{s}_{unit}_{i}" for s in ("max", "min", "cv")}
            tags.add(f"moe/routing_entropy_{unit}_{i}")
    return tags


def test_tensorboard_events_hold_every_scalar_with_the_logged_values(watched_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(watched_run["root"] / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert _expected_tags() <= tags, _expected_tags() - tags
    logged = _logged(watched_run["stdout"])
    assert sorted(logged) == [2, 4, 6]
    for tag in _expected_tags() - {"lm loss validation", "lm loss validation ppl"}:
        assert [e.step for e in events.Scalars(tag)] == [2, 4, 6], tag
    assert [e.step for e in events.Scalars("lm loss validation")] == [4, 6]
    for it, values in logged.items():
        for tag, printed in values.items():
            (value,) = [e.value for e in events.Scalars(tag) if e.step == it]
            assert value == pytest.approx(printed, rel=6e-3, abs=6e-5), (it, tag)
    ppl = {e.step: e.value for e in events.Scalars("lm loss validation ppl")}
    for e in events.Scalars("lm loss validation"):
        assert ppl[e.step] == pytest.approx(math.exp(e.value), rel=1e-5)


def test_metrics_stream_and_summary_hold_the_same_values(watched_run):
    records = {r["iteration"]: r for r in read_metrics(str(watched_run["root"]))}
    assert sorted(records) == [2, 4, 6] and records[6]["consumed_samples"] == 48
    assert _expected_tags() <= set(records[6])
    for it, values in _logged(watched_run["stdout"]).items():
        for tag, printed in values.items():
            assert records[it][tag] == pytest.approx(printed, rel=6e-3, abs=6e-5), (it, tag)
    summary = json.loads((watched_run["root"] / "summary.json").read_text())
    assert summary["final_train_loss"] == records[6]["lm loss"]
    assert summary["valid_loss"] == records[6]["lm loss validation"]
    assert summary["aux_losses"]["z_loss"] == records[6]["z_loss"]
    assert records[6]["throughput"] > 0 and "mfu" not in records[6]  # no peak known on CPU
    assert "throughput:" in watched_run["stdout"] and "memory: rss" in watched_run["stdout"]


def test_default_timing_level_0_logs_and_writes_no_timer(watched_run):
    records = read_metrics(str(watched_run["root"]))
    assert not [k for r in records for k in r if k.endswith("-time") and k != "iteration-time"]
    assert "time across ranks" not in watched_run["stdout"]


def test_summary_records_the_permutation(watched_run):
    summary = json.loads((watched_run["root"] / "summary.json").read_text())
    report = summary["permute_impl"]
    installed = re.search(r"token permutation: (\S+) \(--permute-impl auto\)",
                          watched_run["stdout"])[1]
    assert (report["requested"], report["installed"], report["device"]) == \
        ("auto", installed, "cpu")
    if installed == "custom":  # the kernels ran their self-check on this device
        assert set(report["self_checks"].values()) == {"passed"}, report


def test_profiler_trace_holds_the_named_ranges(watched_run):
    (trace,) = watched_run["root"].glob("profile_rank0_iter3-4.json")
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert set(RANGES) <= names, set(RANGES) - names


def test_wandb_offline_history_holds_the_same_values(watched_run):
    if not watched_run["wandb"]:
        pytest.skip("wandb is not installed (the monitoring extra)")
    from tests.monitoring.wandb_reader import offline_run

    config, history = offline_run(str(watched_run["root"]))
    records = {r["iteration"]: r for r in read_metrics(str(watched_run["root"]))}
    assert config["model"]["routing"] == "path"
    rows: dict[int, dict] = {}
    for row in history:
        rows.setdefault(row["_step"], {}).update(row)
    assert sorted(rows) == [2, 4, 6]
    for it, row in rows.items():
        for tag in ("lm loss", "grad-norm", "z_loss", "moe/routing_entropy_block_2"):
            assert row[tag] == records[it][tag], (it, tag)
        assert row["consumed-samples"] == records[it]["consumed_samples"]


def _run_until_lines(cmd: list[str], stream: str, lines: int, log: str,
                     timeout: float = 300) -> str:
    """Run ``cmd`` in its own session and SIGKILL it once ``stream`` holds ``lines`` lines;
    returns its output."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True,
                                env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"))
        deadline = time.time() + timeout
        try:
            while time.time() < deadline and proc.poll() is None:
                if os.path.exists(stream) and open(stream, "rb").read().count(b"\n") >= lines:
                    break
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return open(log).read()


def test_sigkill_then_resume_continues_the_stream(demo_data, tmp_path):
    ckpt = tmp_path / "ckpt"
    cmd = _pretrain(*_data(demo_data), "--train-iters", "7", "--log-interval", "1",
                    "--save", str(ckpt), "--save-interval", "3")
    killed = _run_until_lines(cmd, str(ckpt / "metrics.jsonl"), 5, str(tmp_path / "log"))
    assert "saved" in killed and "iter      7/7" not in killed, killed[-3000:]
    lines = (ckpt / "metrics.jsonl").read_bytes().split(b"\n")
    complete = [json.loads(x)["iteration"] for x in lines[:-1]]  # each ends with a newline
    assert complete[:5] == [1, 2, 3, 4, 5] and lines[-1] == b"" and len(complete) < 7
    before = {it: f"{loss:.4f}" for it, loss in _logged_losses(killed).items()}
    result = run_cli(cmd[1:] + ["--load", str(ckpt)], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"dropped {len(complete) - 3} line(s) after iteration 3" in result.stdout
    lines = [json.loads(x) for x in (ckpt / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in lines if "lm loss" in r]  # the last line: the final validation
    assert [r["iteration"] for r in records] == list(range(1, 8)) and len(lines) == 8
    assert set(lines[-1]) > {"lm loss validation"} and lines[-1]["iteration"] == 7
    assert [r["consumed_samples"] for r in records] == [8 * i for i in range(1, 8)]
    # Resuming is exact, so the rewritten iterations 4 and 5 are the killed run's.
    for it in (4, 5):
        assert f"{records[it - 1]['lm loss']:.4f}" == before[it]


def _logged_losses(stdout: str) -> dict[int, float]:
    return {int(m[1]): float(m[2]) for m in re.finditer(r"iter +(\d+)/\d+ \| loss ([\d.]+)",
                                                         stdout)}
