"""The monitoring flags: Megatron-LM's names and defaults, help for each, validation, and no
clash with pathmoe-pretrain's own flags."""

from __future__ import annotations

import argparse

import pytest

from megatron_pathmoe.config import ConfigError
from megatron_pathmoe.monitoring import MonitoringConfig, add_monitoring_args


def parse(*argv: str) -> MonitoringConfig:
    return MonitoringConfig.from_args(add_monitoring_args(argparse.ArgumentParser())
                                      .parse_args(list(argv)))


def test_defaults_are_megatron_lm_core_v0_16_1s():
    cfg = parse()
    assert (cfg.tensorboard_dir, cfg.tensorboard_log_interval, cfg.tensorboard_queue_size) == \
        (None, 1, 1000)
    assert cfg.log_learning_rate_to_tensorboard and cfg.log_loss_scale_to_tensorboard
    assert not (cfg.log_timers_to_tensorboard or cfg.log_validation_ppl_to_tensorboard
                or cfg.log_memory_to_tensorboard or cfg.log_world_size_to_tensorboard)
    assert (cfg.wandb_project, cfg.wandb_exp_name, cfg.wandb_save_dir, cfg.wandb_entity) == \
        ("", "", "", "")
    assert (cfg.profile, cfg.profile_step_start, cfg.profile_step_end, cfg.profile_ranks) == \
        (False, 10, 12, [0])
    assert cfg.metrics_stream and cfg == MonitoringConfig()


def test_flags_reach_the_config():
    cfg = parse("--tensorboard-dir", "tb", "--tensorboard-log-interval", "5",
                "--no-log-loss-scale-to-tensorboard", "--log-memory-to-tensorboard",
                "--wandb-project", "p", "--wandb-entity", "me", "--log-throughput",
                "--no-metrics-stream", "--profile", "--profile-ranks", "0", "3")
    assert cfg.tensorboard_dir == "tb" and cfg.tensorboard_log_interval == 5
    assert not cfg.log_loss_scale_to_tensorboard and cfg.log_memory_to_tensorboard
    assert (cfg.wandb_project, cfg.wandb_entity) == ("p", "me")
    assert cfg.log_throughput and not cfg.metrics_stream and cfg.profile_ranks == [0, 3]


@pytest.mark.parametrize("argv,flag", [
    (["--tensorboard-log-interval", "0"], "--tensorboard-log-interval"),
    (["--profile", "--profile-step-start", "5", "--profile-step-end", "5"], "--profile-step-start"),
])
def test_bad_values_name_the_flag(argv, flag):
    with pytest.raises(ConfigError, match=flag):
        parse(*argv)


def test_every_flag_has_help_and_fits_the_pretrain_parser():
    from megatron_pathmoe.training.arguments import build_parser

    parser = build_parser()  # holds the monitoring groups (argparse raised on a clash)
    ours = add_monitoring_args(argparse.ArgumentParser())
    for action in ours._actions:
        assert action.help, action.option_strings
    assert "--tensorboard-queue-size" in parser.format_help()
