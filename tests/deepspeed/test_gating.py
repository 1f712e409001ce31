"""Block-shared gates on DeepSpeed's MoE layers, one process (no engine needed)."""

from __future__ import annotations

import copy

import pytest
import torch

from megatron_pathmoe.integrations.deepspeed import DSModelConfig, DeepSpeedMoEGPT, share_block_gates

# top-1 with token dropping, top-2 drop-free, DeepSpeed's general top-k (k=3) with dropping.
GATINGS = [dict(topk=1, capacity_factor=1.0), dict(topk=2, capacity_factor=None),
           dict(topk=3, capacity_factor=1.5)]


def tiny(block_size: int, **kw) -> DeepSpeedMoEGPT:
    cfg = dict(vocab_size=64, num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
               seq_length=16, num_experts=4, topk=2, path_block_size=block_size)
    return DeepSpeedMoEGPT(DSModelConfig(**{**cfg, **kw}))


def batch(seed: int = 0) -> tuple[torch.Tensor, ...]:
    tokens = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(seed))
    return tokens, tokens.roll(-1, dims=1), torch.ones(3, 16)


def loss_and_grads(model: DeepSpeedMoEGPT, aux_coeff: float) -> tuple[torch.Tensor, list]:
    lm, aux, _ = model(*batch())
    loss = lm + aux_coeff * aux
    loss.backward()
    return loss.detach(), [layer.moe.deepspeed_moe.gate.wg.weight.grad.clone() for layer in model.layers]


def gate_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [layer.moe.deepspeed_moe.gate.wg.weight for layer in model.layers]


def test_one_parameter_and_one_checkpoint_entry_per_block():
    model = tiny(2)
    w = gate_weights(model)
    assert w[0] is w[1] and w[2] is w[3] and w[0] is not w[2]
    gate_params = [n for n, _ in model.named_parameters() if ".gate." in n]
    assert gate_params == ["layers.0.moe.deepspeed_moe.gate.wg.weight",
                           "layers.2.moe.deepspeed_moe.gate.wg.weight"]
    assert [k for k in model.state_dict() if ".gate." in k] == gate_params
    assert w[0].pathmoe_tie == "path.block0.weight" and w[2].pathmoe_tie == "path.block1.weight"
    assert set(model.shared_gates) == {0, 1} and model.shared_gates[1] is w[2]
    # a state dict loads back into a fresh model and the block stays one tensor
    fresh = tiny(2, seed=7)
    fresh.load_state_dict(model.state_dict())
    assert gate_weights(fresh)[1] is gate_weights(fresh)[0]
    assert torch.equal(gate_weights(fresh)[1], w[1])


@pytest.mark.parametrize("gating", GATINGS, ids=["top1-drop", "top2-dropfree", "top3-drop"])
@pytest.mark.parametrize("aux_coeff", [0.0, 0.01], ids=["noaux", "aux"])
def test_shared_grad_is_sum_of_untied_per_layer_grads(gating, aux_coeff):
    untied = tiny(1, **gating)
    with torch.no_grad():  # same weight in every layer of a block, then tie a copy
        for i, w in enumerate(gate_weights(untied)):
            w.copy_(gate_weights(untied)[i - i % 2])
    tied = copy.deepcopy(untied)
    shared = share_block_gates(tied, 2)
    loss_u, grads_u = loss_and_grads(untied, aux_coeff)
    loss_t, grads_t = loss_and_grads(tied, aux_coeff)
    assert torch.equal(loss_u, loss_t)  # the forward is unchanged
    for block, weight in shared.items():
        torch.testing.assert_close(weight.grad, grads_u[2 * block] + grads_u[2 * block + 1],
                                   rtol=1e-6, atol=1e-9)
        assert torch.equal(grads_t[2 * block], grads_t[2 * block + 1])


@pytest.mark.parametrize("gating", GATINGS, ids=["top1-drop", "top2-dropfree", "top3-drop"])
def test_block_size_one_is_deepspeeds_independent_gating_bitwise(gating):
    model = tiny(1, **gating)
    baseline = copy.deepcopy(model)  # DeepSpeed's MoE layers as built, gates untouched
    linears = [layer.moe.deepspeed_moe.gate.wg for layer in model.layers]
    assert share_block_gates(model, 1) == dict(enumerate(l.weight for l in linears))
    assert [layer.moe.deepspeed_moe.gate.wg for layer in model.layers] == linears
    assert all(type(l) is torch.nn.Linear for l in linears)
    loss_a, grads_a = loss_and_grads(model, 0.01)
    loss_b, grads_b = loss_and_grads(baseline, 0.01)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def one_line_error(excinfo: pytest.ExceptionInfo, *words: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_block_size_must_divide_moe_layers():
    with pytest.raises(ValueError) as e:
        tiny(3)
    one_line_error(e, "--path-block-size 3", "4")


def test_topk_above_experts():
    with pytest.raises(ValueError) as e:
        tiny(2, topk=5)
    one_line_error(e, "--moe-router-topk 5", "--num-experts 4")
    model = tiny(1)
    model.layers[1].moe.deepspeed_moe.gate.k = 5  # a layer built outside our config
    with pytest.raises(ValueError) as e:
        share_block_gates(model, 2)
    one_line_error(e, "MoE layer 1", "top-k 5", "--num-experts")


def test_gate_that_is_not_deepspeeds():
    class MyGate(torch.nn.Module):
        k = 1

    model = tiny(1)
    model.layers[2].moe.deepspeed_moe.gate = MyGate()
    with pytest.raises(TypeError) as e:
        share_block_gates(model, 2)
    one_line_error(e, "MoE layer 2", "MyGate", "TopKGate")


def test_importing_the_integration_does_not_import_deepspeed():
    import subprocess
    import sys

    code = ("import sys, megatron_pathmoe.integrations.deepspeed.train; "
            "assert 'deepspeed' not in sys.modules, 'deepspeed imported at import time'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("flags, words", [
    (["--path-block-size", "3"], ["--path-block-size 3", "--num-layers 8"]),
    (["--moe-router-topk", "9"], ["--moe-router-topk 9", "--num-experts 8"]),
    (["--global-batch-size", "12"], ["--global-batch-size 12", "--micro-batch-size"]),
])
def test_trainer_refuses_bad_flags_in_one_line(flags, words):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "megatron_pathmoe.integrations.deepspeed.train", *flags],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error:") and all(w in last for w in words), proc.stderr
