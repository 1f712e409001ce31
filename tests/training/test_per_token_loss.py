"""--calculate-per-token-loss: megatron-core's schedules, DDP and finalize_model_grads weigh
every unmasked token of the global batch equally. With micro-batch losses S_i over n_i tokens
and G_i the gradient of the mean S_i / n_i, the per-token gradient of a global batch is
sum_i n_i G_i / sum_i n_i, while the default is the mean of the G_i."""

from __future__ import annotations

import torch

from megatron_pathmoe.training.arguments import parse_args

MBS, SEQ = 2, 16
SHAPE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
         "--moe-ffn-hidden-size", "32", "--seq-length", str(SEQ), "--num-experts", "4",
         "--routing", "path", "--path-block-size", "2", "--micro-batch-size", str(MBS)]


def _micro_batch(seed: int, masked_fraction: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 128, (MBS, SEQ + 1), generator=g)
    loss_mask = (torch.rand(MBS, SEQ, generator=g) >= masked_fraction).float()
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": loss_mask,
            "position_ids": torch.arange(SEQ).expand(MBS, SEQ)}


def _grads(micro_batches: list[dict], per_token: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """The global batch's reported loss and main grads after megatron's finalize_model_grads
    (no optimizer step), from the same initial weights every time."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_pathmoe.training.build import build_model_and_optimizer
    from megatron_pathmoe.training.step import _batch_sums, _global_mean

    argv = ["--dry-run", "--dry-run-vocab-size", "128", *SHAPE,
            "--global-batch-size", str(MBS * len(micro_batches))]
    model, train = parse_args(argv + (["--calculate-per-token-loss"] if per_token else []))
    assert model.to_transformer_config().calculate_per_token_loss == per_token
    torch.manual_seed(train.seed)  # as runtime.distributed.initialize does before the build
    model_parallel_cuda_manual_seed(train.seed)
    chunks, _, _ = build_model_and_optimizer(model, train, "cpu")
    for chunk in chunks:
        chunk.zero_grad_buffer()
    loss = _global_mean(_batch_sums(chunks, iter(micro_batches), model, train,
                                    len(micro_batches), forward_only=False))
    return loss, {n: p.main_grad.clone() for n, p in chunks[0].named_parameters()}


def test_per_token_loss_weighs_micro_batches_by_their_tokens(megatron_world1):
    batches = [_micro_batch(1, 0.0), _micro_batch(2, 0.75)]
    counts = [float(b["loss_mask"].sum()) for b in batches]
    assert counts[0] > 2 * counts[1] > 0
    singles = [_grads([b], per_token=False)[1] for b in batches]
    loss, per_token = _grads(batches, per_token=True)
    default_loss, default = _grads(batches, per_token=False)
    assert loss == default_loss  # the logged loss is token-weighted either way
    total = sum(counts)
    differs = 0
    for name, grad in per_token.items():
        expected = (counts[0] * singles[0][name] + counts[1] * singles[1][name]) / total
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(default[name], (singles[0][name] + singles[1][name]) / 2,
                                   rtol=1e-5, atol=1e-7, msg=name)
        differs += int(not torch.allclose(grad, default[name], rtol=1e-3, atol=0))
    assert differs > len(per_token) // 2
    # One micro-batch: the same gradient both ways.
    _, single_per_token = _grads(batches[1:], per_token=True)
    for name, grad in single_per_token.items():
        torch.testing.assert_close(grad, singles[1][name], rtol=1e-5, atol=1e-7, msg=name)
