"""What a --load restores: everything by default; --no-load-optim keeps weights, iteration and
data position but starts Adam and the LR schedule fresh; --no-load-rng skips only the RNG;
--finetune keeps only the weights (Megatron-LM's meanings). In-process, on a world of one."""

from __future__ import annotations

import pytest
import torch

from megatron_pathmoe.config import PathMoEConfig

TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, moe_ffn_hidden_size=32,
            seq_length=16, vocab_size=128, num_experts=4, moe_router_topk=2,
            routing="path", path_block_size=2)
STEPS, GBS = 2, 2


def _train_cfg():
    from megatron_pathmoe.training.arguments import TrainingConfig

    return TrainingConfig(train_iters=8, lr=1e-2, lr_warmup_iters=1, micro_batch_size=GBS,
                          global_batch_size=GBS)


def _build(seed: int):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_pathmoe.training.build import build_model_and_optimizer

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True, force_reset_rng=True)
    cfg = PathMoEConfig(**TINY).validate()
    chunks, optimizer, scheduler = build_model_and_optimizer(cfg, _train_cfg(), "cpu")
    return cfg, chunks, optimizer, scheduler


def _weights(chunks) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in chunks[0].module.named_parameters()}


def _exp_avgs(optimizer) -> list[torch.Tensor]:
    return [s["exp_avg"].clone() for s in optimizer.optimizer.state.values() if "exp_avg" in s]


@pytest.fixture(scope="module")
def saved(megatron_world1, tmp_path_factory):
    """A checkpoint after STEPS real training steps, with what it holds."""
    from megatron_pathmoe.checkpoint import CheckpointMeta, save_checkpoint
    from megatron_pathmoe.training.step import train_step

    cfg, chunks, optimizer, scheduler = _build(seed=1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, TINY["vocab_size"], (GBS, TINY["seq_length"]), generator=g)
    data = dict(tokens=tokens, labels=tokens.roll(-1, 1), loss_mask=torch.ones(tokens.shape),
                position_ids=torch.arange(TINY["seq_length"]).expand(GBS, -1))
    for _ in range(STEPS):
        train_step(chunks, optimizer, scheduler, iter([data]), cfg, _train_cfg(), 1)
    root = str(tmp_path_factory.mktemp("load_options") / "ckpt")
    torch.manual_seed(77)  # the RNG state the checkpoint records
    rng = torch.get_rng_state().clone()
    meta = CheckpointMeta(model=cfg, tokenizer_path="data/shakespeare/tokenizer.json",
                          consumed_samples=STEPS * GBS)
    save_checkpoint(root, STEPS, chunks, optimizer, scheduler, meta)
    return {"root": root, "weights": _weights(chunks), "exp_avg": _exp_avgs(optimizer),
            "num_steps": scheduler.num_steps, "torch_rng": rng}


def _load(saved, **options):
    from megatron_pathmoe.checkpoint import LoadOptions, load_checkpoint

    cfg, chunks, optimizer, scheduler = _build(seed=2)  # other weights than the saved ones
    torch.manual_seed(5)
    rng_before = torch.get_rng_state().clone()
    resume = load_checkpoint(saved["root"], chunks, optimizer, scheduler, cfg,
                             LoadOptions(**options))
    return resume, chunks, optimizer, scheduler, rng_before


def _assert_weights_equal(chunks, saved) -> None:
    now = _weights(chunks)
    assert now.keys() == saved["weights"].keys()
    assert all(torch.equal(now[n], saved["weights"][n]) for n in now)


def _assert_exp_avg_equal(optimizer, saved) -> None:
    loaded = _exp_avgs(optimizer)
    assert len(loaded) == len(saved["exp_avg"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(loaded, saved["exp_avg"]))


def _assert_fresh_optimizer(optimizer, scheduler) -> None:
    assert all(not a.any() for a in _exp_avgs(optimizer))  # absent or zero: no moments
    assert scheduler.num_steps == 0  # Megatron-LM: the schedule is part of the optimizer load


def test_default_load_restores_everything(saved):
    resume, chunks, optimizer, scheduler, _ = _load(saved)
    assert (resume.iteration, resume.consumed_samples) == (STEPS, STEPS * GBS)
    assert resume.optimizer_restored and resume.rng_restored
    _assert_weights_equal(chunks, saved)
    _assert_exp_avg_equal(optimizer, saved)
    assert scheduler.num_steps == saved["num_steps"] == STEPS
    assert torch.equal(torch.get_rng_state(), saved["torch_rng"])


def test_no_load_optim_keeps_weights_iteration_and_rng(saved):
    resume, chunks, optimizer, scheduler, _ = _load(saved, optimizer=False)
    assert (resume.iteration, resume.consumed_samples) == (STEPS, STEPS * GBS)
    assert not resume.optimizer_restored and resume.rng_restored
    _assert_weights_equal(chunks, saved)
    _assert_fresh_optimizer(optimizer, scheduler)
    # The optimizer's main params follow the loaded weights: a step starts from them.
    main = [p for g in optimizer.param_groups for p in g["params"]]
    assert sum(p.numel() for p in main) == sum(w.numel() for w in saved["weights"].values())


def test_no_load_rng_differs_only_in_rng(saved):
    resume, chunks, optimizer, scheduler, rng_before = _load(saved, rng=False)
    assert resume.iteration == STEPS and resume.optimizer_restored and not resume.rng_restored
    _assert_weights_equal(chunks, saved)
    _assert_exp_avg_equal(optimizer, saved)
    assert scheduler.num_steps == STEPS
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert not torch.equal(rng_before, saved["torch_rng"])


def test_finetune_takes_the_weights_only(saved):
    resume, chunks, optimizer, scheduler, rng_before = _load(saved, finetune=True)
    assert (resume.iteration, resume.consumed_samples) == (0, 0)
    assert not resume.optimizer_restored and not resume.rng_restored
    _assert_weights_equal(chunks, saved)
    _assert_fresh_optimizer(optimizer, scheduler)
    assert torch.equal(torch.get_rng_state(), rng_before)


# --------------------------------------------------------------------------- through the CLI

def test_no_load_rng_and_finetune_through_the_cli(demo_data, tmp_path):
    """With dropout the RNG decides the masks: a full resume continues bitwise, --no-load-rng
    continues from the same state with other masks; --finetune restarts at iteration 0."""
    from tests.training.cluster_runs import data_args, run, summary

    common = [*data_args(demo_data), "--hidden-dropout", "0.2", "--train-iters", "3"]
    ckpt = tmp_path / "ckpt"
    run([*common, "--save", str(ckpt), "--save-interval", "2",
         "--summary-json", str(tmp_path / "ref.json")])
    reference = summary(tmp_path / "ref.json")["train_losses"]

    def resumed(*flags: str) -> tuple[str, dict]:
        path = tmp_path / f"{'_'.join(flags) or 'full'}.json"
        out = run([*common, "--load", str(ckpt / "iter_0000002"), *flags,
                   "--summary-json", str(path)])
        return out, summary(path)

    _, full = resumed()
    assert full["train_losses"] == reference[2:]
    out, no_rng = resumed("--no-load-rng")
    assert "RNG states not restored (--no-load-rng)" in out and no_rng["start_iteration"] == 2
    assert no_rng["train_losses"] != reference[2:]
    out, tuned = resumed("--finetune")
    assert "(--finetune): iteration 0" in out
    assert tuned["start_iteration"] == 0 and len(tuned["train_losses"]) == 3
