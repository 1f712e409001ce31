"""The CPU platform layer: CUDA call sites map to the CPU, unmapped ones fail loudly."""

from __future__ import annotations

import pytest
import torch

from megatron_pathmoe.platform import (
    UnhandledCudaCallError,
    clear_unhandled_cuda_calls,
    cpu_platform_enabled,
    disable_cpu_platform,
    enable_cpu_platform,
    unhandled_cuda_calls,
)


def test_cuda_placements_map_to_cpu(megatron_world1):
    assert cpu_platform_enabled()
    x = torch.zeros(3, device=torch.cuda.current_device())
    assert x.device.type == "cpu"
    assert torch.ones(2, device="cuda").to("cuda:0", non_blocking=True).device.type == "cpu"
    assert x.cuda() is x
    assert x.type() == "torch.cuda.FloatTensor"  # what megatron's optimizer asserts
    with torch.cuda.stream(torch.cuda.Stream()):
        torch.cuda.synchronize()


def test_cuda_rng_is_the_cpu_generator(megatron_world1):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(11)
    with get_cuda_rng_tracker().fork():
        a = torch.rand(4)
    with get_cuda_rng_tracker().fork():
        b = torch.rand(4)
    assert not torch.equal(a, b), "the forked stream must advance"
    model_parallel_cuda_manual_seed(11)
    with get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), a), "re-seeding must reproduce the stream"


def test_unhandled_cuda_call_raises_and_is_recorded(megatron_world1):
    clear_unhandled_cuda_calls()
    with pytest.raises(UnhandledCudaCallError, match=r"test_platform\.py:\d+"):
        torch.cuda.get_device_properties(0)
    # A caller that swallows the exception is still caught by the record.
    try:
        torch.cuda.get_device_name(0)
    except Exception:
        pass
    calls = unhandled_cuda_calls()
    assert len(calls) == 2 and all("test_platform.py" in c for c in calls)
    clear_unhandled_cuda_calls()


def test_training_stack_reaches_no_unhandled_cuda_call(megatron_world1):
    """Model, DDP, optimizer, schedule, finalize_model_grads, both dispatchers: a new
    megatron CUDA call on this path makes this test fail and names the call site."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_pathmoe.config import PathMoEConfig
    from megatron_pathmoe.training.arguments import TrainingConfig
    from megatron_pathmoe.model import forward_step
    from megatron_pathmoe.training.build import build_model_and_optimizer

    clear_unhandled_cuda_calls()
    for dispatcher in ("alltoall", "allgather"):
        cfg = PathMoEConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                            moe_ffn_hidden_size=32, seq_length=8, vocab_size=64, num_experts=4,
                            path_block_size=2, moe_aux_loss_coeff=0.01,
                            moe_token_dispatcher_type=dispatcher).validate(1)
        train = TrainingConfig(train_iters=2, lr_warmup_iters=0, micro_batch_size=2,
                               global_batch_size=4)
        chunks, optimizer, scheduler = build_model_and_optimizer(cfg, train, "cpu")
        tokens = torch.randint(0, 64, (2, 8))
        batch = dict(tokens=tokens, labels=tokens, loss_mask=torch.ones(2, 8),
                     position_ids=torch.arange(8).expand(2, -1))
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch, batch]), model=chunks,
            num_microbatches=2, seq_length=8, micro_batch_size=2, forward_only=False)
        updated, grad_norm, _ = optimizer.step()
        assert updated and grad_norm > 0
    assert unhandled_cuda_calls() == []


def test_disable_restores_torch_cuda_and_refuses_on_gpu_machines(monkeypatch):
    if cpu_platform_enabled():
        disable_cpu_platform()
        try:
            assert torch.cuda.current_stream.__module__.startswith("torch")
            with pytest.raises((AssertionError, RuntimeError)):
                torch.zeros(1, device="cuda")
            monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
            with pytest.raises(RuntimeError, match="--device cpu"):
                enable_cpu_platform()
        finally:
            monkeypatch.undo()
            enable_cpu_platform()
    assert cpu_platform_enabled()


def test_backward_allocations_with_current_device_work(megatron_world1):
    """Backward runs outside the function mode; megatron's collectives allocate there with
    device=torch.cuda.current_device() (the EP/TP all-to-all backward)."""

    class AllocatesInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            out = grad.new_empty(grad.shape, device=torch.cuda.current_device())
            return out.copy_(grad * 2)

    x = torch.ones(3, requires_grad=True)
    AllocatesInBackward.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))
