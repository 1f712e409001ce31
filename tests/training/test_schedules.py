"""Megatron-LM's schedule and budget flags reach megatron-core's OptimizerParamScheduler as
Megatron-LM passes them: the LR per iteration equals the schedule's formula evaluated here
independently (and hand-computed points), a sample budget gives the same LRs as the equivalent
iteration budget, --adam-eps reaches Adam and --start/--end-weight-decay the param groups."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_pathmoe.training.arguments import parse_args

GBS = 4
SHAPE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
         "--moe-ffn-hidden-size", "32", "--seq-length", "16", "--num-experts", "4",
         "--routing", "path", "--path-block-size", "2", "--global-batch-size", str(GBS)]
MODEL = ["--dry-run", "--dry-run-vocab-size", "128", "--micro-batch-size", str(GBS), *SHAPE]
LR, MIN_LR, INIT = 1e-2, 1e-3, 1e-4


def _configs(argv: list[str]):
    return parse_args(MODEL + ["--lr", str(LR), "--min-lr", str(MIN_LR)] + argv)


def _built(argv: list[str]):
    from megatron_pathmoe.training.build import build_model_and_optimizer

    model, train = _configs(argv)
    chunks, optimizer, scheduler = build_model_and_optimizer(model, train, "cpu")
    return train, chunks, optimizer, scheduler


def _lrs(argv: list[str], iterations: int | None = None) -> list[float]:
    """The LR after each iteration's scheduler step (train_step's increment), iteration 0
    first."""
    train, _, optimizer, scheduler = _built(argv)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(iterations or train.train_iters):
        scheduler.step(increment=train.lr_schedule().step_increment(train.global_batch_size))
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def _expected(k: float, style: str, warmup: float, decay: float, wsd: float = 0.0,
              wsd_style: str = "exponential", init: float = 0.0) -> float:
    """Megatron-LM's schedule (megatron/core/optimizer_param_scheduler.py), written out."""
    if warmup > 0 and k <= warmup:
        return init + (LR - init) * k / warmup
    if style == "constant":
        return LR
    if k > decay:
        return MIN_LR
    if style == "inverse-square-root":
        return max(MIN_LR, LR * math.sqrt(max(warmup, 1)) / math.sqrt(max(k, 1)))
    ratio = (k - warmup) / (decay - warmup)
    if style == "linear":
        coeff = 1 - ratio
    elif style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1)
    else:  # WSD: flat until the last `wsd` steps, then anneal
        r = max(0.0, (k - (decay - wsd)) / wsd)
        coeff = {"exponential": 2 * 0.5 ** r - 1, "linear": 1 - r,
                 "cosine": 0.5 * (math.cos(math.pi * r) + 1),
                 "minus_sqrt": 1 - math.sqrt(r)}[wsd_style]
    return MIN_LR + coeff * (LR - MIN_LR)


STYLES = {
    "linear": (["--lr-decay-style", "linear"], dict(style="linear")),
    "cosine": (["--lr-decay-style", "cosine"], dict(style="cosine")),
    "constant": (["--lr-decay-style", "constant"], dict(style="constant")),
    "inverse-square-root": (["--lr-decay-style", "inverse-square-root"],
                            dict(style="inverse-square-root")),
    **{f"WSD-{s}": (["--lr-decay-style", "WSD", "--lr-wsd-decay-style", s,
                     "--lr-wsd-decay-iters", "4"], dict(style="WSD", wsd=4, wsd_style=s))
       for s in ("exponential", "linear", "cosine", "minus_sqrt")},
}


@pytest.mark.parametrize("name", STYLES)
def test_each_decay_style_follows_megatrons_formula(megatron_world1, name):
    """12 iterations: warmup 2 from --lr-warmup-init, decay over 10, min LR for the last 2."""
    argv, kind = STYLES[name]
    budget = ["--train-iters", "12", "--lr-warmup-iters", "2", "--lr-decay-iters", "10",
              "--lr-warmup-init", str(INIT)]
    lrs = _lrs(budget + argv)
    expected = [_expected(k, warmup=2, decay=10, init=INIT, **kind) for k in range(13)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=0)
    assert lrs[0] == INIT and lrs[2] == LR  # warmup start and end, exactly
    if name != "constant":
        assert lrs[11] == lrs[12] == MIN_LR  # past --lr-decay-iters
    if name.startswith("WSD"):
        assert lrs[2:7] == pytest.approx([LR] * 5, rel=1e-15)  # stable until the 4-step anneal
        assert lrs[7] < LR
        assert lrs[10] == pytest.approx(MIN_LR, abs=1e-15)  # the anneal ends at min LR


def test_hand_computed_cosine_and_fraction_warmup(megatron_world1):
    lrs = _lrs(["--train-iters", "10", "--lr-warmup-fraction", "0.2"])
    assert lrs[1] == pytest.approx(LR / 2)  # warmup 0.2 x 10 = 2 iterations
    assert lrs[6] == pytest.approx(MIN_LR + (LR - MIN_LR) / 2)  # half-way through the cosine
    assert lrs[10] == pytest.approx(MIN_LR)


@pytest.mark.parametrize("iters, samples", [
    (["--train-iters", "12", "--lr-warmup-iters", "2", "--lr-decay-iters", "10"],
     ["--train-samples", str(12 * GBS), "--lr-warmup-samples", str(2 * GBS),
      "--lr-decay-samples", str(10 * GBS)]),
    (["--train-iters", "12", "--lr-warmup-fraction", "0.25", "--lr-decay-style", "linear"],
     ["--train-samples", str(12 * GBS + 3), "--lr-decay-samples", str(12 * GBS),
      "--lr-warmup-fraction", "0.25", "--lr-decay-style", "linear"]),
    (["--train-iters", "12", "--lr-warmup-iters", "2", "--lr-decay-style", "WSD",
      "--lr-wsd-decay-iters", "5", "--lr-wsd-decay-style", "cosine"],
     ["--train-samples", str(12 * GBS), "--lr-warmup-samples", str(2 * GBS),
      "--lr-decay-style", "WSD", "--lr-wsd-decay-samples", str(5 * GBS),
      "--lr-wsd-decay-style", "cosine"]),
    (["--train-iters", "12", "--lr-warmup-iters", "3", "--lr-decay-style",
      "inverse-square-root"],
     ["--train-samples", str(12 * GBS), "--lr-warmup-samples", str(3 * GBS),
      "--lr-decay-style", "inverse-square-root"]),
], ids=["cosine", "fraction-linear", "wsd", "inverse-square-root"])
def test_sample_budget_equals_the_iteration_budget(megatron_world1, iters, samples):
    _, train = _configs(samples)
    assert train.train_iters == 12  # train_samples // global batch (remainder dropped)
    assert _lrs(samples) == pytest.approx(_lrs(iters), rel=1e-14, abs=0)


def test_a_zero_warmup_of_the_other_kind_is_allowed():
    """Megatron-LM asserts --lr-warmup-iters == 0 with samples or a fraction: 0 passes."""
    _, train = _configs(["--train-samples", "40", "--lr-warmup-iters", "0"])
    assert (train.train_iters, train.lr_warmup_iters) == (10, 0)
    _, train = _configs(["--lr-warmup-iters", "0", "--lr-warmup-fraction", "0.1"])
    assert train.lr_schedule().warmup_steps == pytest.approx(10.0)  # of 100 default iterations


def test_sample_warmup_counts_samples(megatron_world1):
    """A warmup of 6 samples with 4 per iteration: not a whole number of iterations."""
    lrs = _lrs(["--train-samples", "40", "--lr-warmup-samples", "6", "--lr-decay-style",
                "constant"])
    assert lrs[1] == pytest.approx(LR * 4 / 6) and lrs[2] == LR


def test_train_step_steps_the_schedule_by_its_unit(megatron_world1):
    """Real steps (train_step) under a sample budget give the iteration budget's LRs."""
    from megatron_pathmoe.training.step import train_step

    def run(argv: list[str]) -> list[float]:
        train, chunks, optimizer, scheduler = _built(argv)
        model, _ = _configs(argv)
        tokens = torch.randint(0, 128, (GBS, 16), generator=torch.Generator().manual_seed(0))
        batch = dict(tokens=tokens, labels=tokens.roll(-1, 1), loss_mask=torch.ones(GBS, 16),
                     position_ids=torch.arange(16).expand(GBS, -1))
        return [train_step(chunks, optimizer, scheduler, iter([batch]), model, train, 1).lr
                for _ in range(3)]

    by_samples = run(["--train-samples", str(6 * GBS), "--lr-warmup-samples", str(2 * GBS)])
    assert by_samples == run(["--train-iters", "6", "--lr-warmup-iters", "2"])
    assert by_samples[:2] == [pytest.approx(LR / 2), LR]


def test_adam_eps_and_weight_decay_increment_reach_the_optimizer(megatron_world1):
    argv = ["--train-iters", "4", "--lr-warmup-iters", "0", "--adam-eps", "1e-5",
            "--start-weight-decay", "0.0", "--end-weight-decay", "0.2",
            "--weight-decay-incr-style", "linear"]
    train, _, optimizer, scheduler = _built(argv)
    groups = optimizer.param_groups
    assert {g["eps"] for g in groups} == {1e-5}
    decayed = [g for g in groups if g.get("wd_mult", 1.0) == 1.0]
    assert decayed and len(decayed) < len(groups)  # norms keep no weight decay
    for k in range(1, 5):
        scheduler.step(increment=1)
        assert [g["weight_decay"] for g in decayed] == pytest.approx([0.2 * k / 4] * len(decayed))
        assert {g["weight_decay"] for g in groups if g not in decayed} == {0.0}


@pytest.mark.parametrize("argv, words", [
    (["--train-iters", "4", "--train-samples", "16"], "--train-iters or --train-samples"),
    (["--train-samples", "16", "--lr-decay-iters", "4"], "--lr-decay-iters goes with"),
    (["--train-iters", "4", "--lr-warmup-samples", "8"], "--lr-warmup-samples goes with"),
    (["--lr-warmup-iters", "2", "--lr-warmup-fraction", "0.1"], "--lr-warmup-fraction"),
    (["--train-iters", "4", "--lr-warmup-iters", "4"], "--lr-warmup-iters"),
    (["--train-samples", "3"], "--train-samples 3 is below one global batch"),
    (["--lr-decay-style", "WSD"], "--lr-wsd-decay-iters"),
    (["--train-samples", "40", "--lr-decay-style", "WSD"], "--lr-wsd-decay-samples"),
    (["--start-weight-decay", "0", "--end-weight-decay", "0.1"], "--weight-decay-incr-style"),
    (["--start-weight-decay", "0.2", "--end-weight-decay", "0.1",
      "--weight-decay-incr-style", "linear"], "--start-weight-decay"),
    (["--override-opt_param-scheduler", "--use-checkpoint-lr-scheduler"], "contradict"),
])
def test_inconsistent_schedules_fail_in_one_line(capsys, argv, words):
    with pytest.raises(SystemExit):
        _configs(argv)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err


@pytest.mark.parametrize("override", [False, True])
def test_a_loaded_schedule_comes_from_the_checkpoint_unless_overridden(megatron_world1,
                                                                       override):
    """What a --load does with the scheduler's state (megatron-core's load_state_dict): steps
    and decay length from the checkpoint, or from the flags with the override. The LR bounds
    always follow --lr/--min-lr: megatron-core 0.16.1's param groups carry them and take
    precedence over the scheduler's (as in Megatron-LM)."""
    saved_train, _, _, saved = _built(["--train-iters", "8", "--lr-warmup-iters", "0"])
    for _ in range(3):
        saved.step(increment=saved_train.lr_schedule().step_increment(
            saved_train.global_batch_size))
    argv = ["--train-iters", "16", "--lr-warmup-iters", "0", "--lr", "2e-2"]
    _, _, optimizer, scheduler = _built(argv + (["--override-opt_param-scheduler"] if override
                                                else []))
    scheduler.load_state_dict(saved.state_dict())
    assert scheduler.num_steps == 3  # the position always comes from the checkpoint
    assert (scheduler.max_lr, scheduler.lr_decay_steps) == ((2e-2, 16) if override else (LR, 8))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(
        MIN_LR + (2e-2 - MIN_LR) * 0.5 * (1 + math.cos(math.pi * 3 / scheduler.lr_decay_steps)))


def test_a_sample_budget_runs_through_the_trainer(demo_data, tmp_path):
    """pathmoe-pretrain --train-samples 21 with a global batch of 4: 5 iterations (20 samples),
    and each logged LR is the sample-counted schedule's (warmup 6 samples, linear decay)."""
    import json

    from tests.conftest import run_cli

    summary = tmp_path / "summary.json"
    result = run_cli(["-m", "megatron_pathmoe.training.pretrain", "--data-path",
                      demo_data["train_prefix"], "--tokenizer-model", demo_data["tokenizer"],
                      *SHAPE, "--micro-batch-size", "2", "--train-samples", "21", "--lr", str(LR),
                      "--min-lr", str(MIN_LR), "--lr-warmup-samples", "6", "--lr-decay-style",
                      "linear", "--log-interval", "1", "--eval-iters", "1",
                      "--summary-json", str(summary)])
    assert result.returncode == 0, result.stderr[-3000:]
    s = json.loads(summary.read_text())
    assert (s["iterations"], s["consumed_samples"], len(s["train_losses"])) == (5, 20, 5)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [line["learning-rate"] for line in lines if "learning-rate" in line]
    assert lrs == pytest.approx([_expected(4 * k, "linear", warmup=6, decay=21)
                                 for k in range(1, 6)], rel=1e-12)


def test_decoupled_lr_gives_embedding_and_output_their_own_bounds(megatron_world1):
    """--decoupled-lr/--decoupled-min-lr: megatron-core puts the input embedding and output
    layer in their own param group, whose LR follows the same schedule between its own
    bounds; every other group follows --lr/--min-lr."""
    argv = ["--train-iters", "8", "--lr-warmup-iters", "2", "--lr-decay-style", "linear",
            "--decoupled-lr", "0.05", "--decoupled-min-lr", "0.005"]
    train, chunks, optimizer, scheduler = _built(argv)
    embedding = {id(p) for chunk in chunks for n, p in chunk.named_parameters()
                 if "word_embeddings" in n or "output_layer" in n}
    groups = optimizer.param_groups
    decoupled = [g for g in groups if {id(p) for p in g["params"]} & embedding]
    assert decoupled and all({id(p) for p in g["params"]} <= embedding for g in decoupled)
    others = [g for g in groups if g not in decoupled]
    for k in range(1, 9):
        scheduler.step(increment=train.lr_schedule().step_increment(train.global_batch_size))
        for group in decoupled:
            assert group["lr"] == pytest.approx(
                0.005 + (_expected(k, "linear", 2, 8) - MIN_LR) / (LR - MIN_LR) * 0.045)
        for group in others:
            assert group["lr"] == pytest.approx(_expected(k, "linear", 2, 8))


@pytest.mark.parametrize("argv, needle", [
    (["--decoupled-min-lr", "0.001"], "--decoupled-min-lr needs --decoupled-lr"),
    (["--decoupled-lr", "0.01", "--decoupled-min-lr", "0.02"], "<= --decoupled-lr"),
])
def test_bad_decoupled_lr_is_refused_in_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit):
        _configs(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_resume_refuses_other_decoupled_lr(monkeypatch):
    """The embedding/output param group carries its LR bounds in the optimizer state: --load
    with other --decoupled-* values fails before launch, naming both."""
    import megatron_pathmoe.checkpoint as checkpoint
    import megatron_pathmoe.checkpoint.record as record
    from megatron_pathmoe.checkpoint.record import RunConfig
    from megatron_pathmoe.config import ConfigError, PathMoEConfig
    from megatron_pathmoe.data.encoders import TokenizerSpec
    from megatron_pathmoe.training.cluster import check_resumable

    saved = RunConfig(model=PathMoEConfig(), iteration=4, tokenizer_path="", tokenizer_sha256="",
                      training={"decoupled_lr": 0.05, "decoupled_min_lr": None})
    monkeypatch.setattr(checkpoint, "find_checkpoint", lambda path: path)
    monkeypatch.setattr(checkpoint, "read_run_config", lambda path: saved)
    monkeypatch.setattr(record, "tokenizer_differences", lambda run, spec: [])
    same = {"decoupled_lr": 0.05, "decoupled_min_lr": None}
    check_resumable("ckpt", PathMoEConfig(), TokenizerSpec(), same)
    with pytest.raises(ConfigError, match=r"--decoupled-lr 0.1 \(the checkpoint's: 0.05\)"):
        check_resumable("ckpt", PathMoEConfig(), TokenizerSpec(), {**same, "decoupled_lr": 0.1})
