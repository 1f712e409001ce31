"""TensorBoard and W&B sinks read back with their own readers; the Monitor's fan-out."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from megatron_pathmoe.monitoring import Monitor, MonitoringConfig, read_metrics
from megatron_pathmoe.monitoring.sinks import INSTALL_HINT, MonitoringUnavailable

LAYERS, EXPERTS, INTERVAL = 4, 8, 5


def _intervals():
    """Four log intervals of a fake run: (iteration, scalars, load, entropy)."""
    for k in range(1, 5):
        load = torch.ones(LAYERS, EXPERTS)
        load[:, 0] += 0.1 * k
        load[:, 1] -= 0.1 * k
        scalars = {"lm loss": 10.0 / k, "load_balancing_loss": 1.0 + k / 100,
                   "grad-norm": 2.0 * k, "learning-rate": 1e-4 * k, "loss-scale": 1.0,
                   "tokens-per-second": 1000.0 + k, "throughput": 0.5 * k, "mfu": 0.01 * k,
                   "mem-rss-bytes": 1e9 + k, "skipped-iterations": 0.0}
        yield INTERVAL * k, scalars, load, torch.full((LAYERS,), math.log(EXPERTS) * k / 5)


def _run(cfg: MonitoringConfig, run_dir: str, run_config=None) -> None:
    monitor = Monitor.from_config(cfg, run_dir, router_block_size=2, writer=True,
                                  run_config=run_config)
    for iteration, scalars, load, entropy in _intervals():
        monitor.write(iteration, scalars, consumed_samples=8 * iteration, expert_load=load,
                      routing_entropy=entropy)
        if iteration % 10 == 0:
            monitor.write(iteration, {"lm loss validation": 3.0,
                                      "lm loss validation ppl": math.exp(3.0)},
                          consumed_samples=8 * iteration)
    monitor.close()


def test_tensorboard_events_hold_every_tag_once_per_interval(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = MonitoringConfig(tensorboard_dir=str(tmp_path / "tb"), log_memory_to_tensorboard=True,
                           log_validation_ppl_to_tensorboard=True,
                           expert_load_histogram_interval=10)
    _run(cfg, str(tmp_path))
    events = EventAccumulator(cfg.tensorboard_dir, size_guidance={"scalars": 0,
                                                                   "histograms": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    records = read_metrics(str(tmp_path))  # the stream holds the same values
    expected = {k for r in records for k in r} - {"iteration", "consumed_samples", "wall_time"}
    assert expected <= tags
    assert {"moe/expert_load_cv_layer_4", "moe/routing_entropy_block_2",
            "lm loss vs samples", "lm loss validation ppl"} <= tags
    for tag in expected:
        points = events.Scalars(tag)
        rows = [r for r in records if r.get(tag) is not None]
        assert [p.step for p in points] == [r["iteration"] for r in rows], tag
        assert [p.value for p in points] == pytest.approx([r[tag] for r in rows], rel=1e-6)
    assert [p.value for p in events.Scalars("moe/expert_load_max_layer_1")] == \
        pytest.approx([1.1, 1.2, 1.3, 1.4])
    assert [p.value for p in events.Scalars("moe/routing_entropy_layer_3")] == \
        pytest.approx([0.2, 0.4, 0.6, 0.8])
    # Histograms only at the slower interval: iterations 5 (first), 10, 20.
    assert [h.step for h in events.Histograms("moe/expert_load_layer_2")] == [5, 10, 20]


def test_tensorboard_switches_and_interval(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = MonitoringConfig(tensorboard_dir=str(tmp_path / "tb"), tensorboard_log_interval=10,
                           log_learning_rate_to_tensorboard=False,
                           log_loss_scale_to_tensorboard=False, metrics_stream=False)
    _run(cfg, str(tmp_path))
    events = EventAccumulator(cfg.tensorboard_dir)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert not {"learning-rate", "loss-scale", "mem-rss-bytes", "lm loss validation ppl"} & tags
    assert [p.step for p in events.Scalars("lm loss")] == [10, 20]
    assert not (tmp_path / "metrics.jsonl").exists()


def test_wandb_offline_history_and_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from tests.monitoring.wandb_reader import offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = MonitoringConfig(wandb_project="pathmoe-test", wandb_exp_name="tiny",
                           wandb_save_dir=str(tmp_path / "wandb_dir"))
    _run(cfg, str(tmp_path), run_config={"routing": "path", "num_layers": LAYERS})
    config, history = offline_run(cfg.wandb_save_dir)
    assert config["routing"] == "path" and config["num_layers"] == LAYERS
    records = read_metrics(str(tmp_path))
    by_step: dict[int, dict] = {}
    for row in history:
        by_step.setdefault(row["_step"], {}).update(row)
    assert sorted(by_step) == [r["iteration"] for r in records]
    for record in records:
        logged = by_step[record["iteration"]]
        for tag, value in record.items():
            if tag not in ("iteration", "wall_time") and value is not None:
                key = "consumed-samples" if tag == "consumed_samples" else tag
                assert logged[key] == pytest.approx(value, rel=1e-12), tag


def test_missing_package_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(MonitoringUnavailable) as error:
        Monitor.from_config(MonitoringConfig(wandb_project="p"), str(tmp_path), writer=True)
    message = str(error.value)
    assert "--wandb-project" in message and INSTALL_HINT in message and "\n" not in message


def test_other_ranks_write_nothing(tmp_path):
    monitor = Monitor.from_config(MonitoringConfig(tensorboard_dir=str(tmp_path / "tb")),
                                  str(tmp_path), writer=False)
    monitor.write(1, {"lm loss": 1.0}, consumed_samples=1)
    monitor.close()
    assert not list(tmp_path.iterdir())


def test_resume_drops_what_the_resumed_run_rewrites(tmp_path):
    """Killed after iteration 20, resumed from the checkpoint at 10: TensorBoard (purge_step)
    and metrics.jsonl both end with one point per iteration, the resumed run's values."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = MonitoringConfig(tensorboard_dir=str(tmp_path / "tb"))
    for resume, values in ((0, {5: 1.0, 10: 2.0, 15: 3.0, 20: 4.0}), (10, {15: 30.0, 20: 40.0})):
        monitor = Monitor.from_config(cfg, str(tmp_path), resume_iteration=resume, writer=True,
                                      log=lambda _: None)
        for iteration, value in values.items():
            monitor.write(iteration, {"lm loss": value}, consumed_samples=iteration)
        monitor.close()
    events = EventAccumulator(cfg.tensorboard_dir)
    events.Reload()
    assert [(p.step, p.value) for p in events.Scalars("lm loss")] == \
        [(5, 1.0), (10, 2.0), (15, 30.0), (20, 40.0)]
    assert [(r["iteration"], r["lm loss"]) for r in read_metrics(str(tmp_path))] == \
        [(5, 1.0), (10, 2.0), (15, 30.0), (20, 40.0)]
