"""--overlap-grad-reduce and --overlap-param-gather (megatron DDP with the distributed
optimizer, DP2 over gloo) train exactly like the run without them, and checkpoint the same
weights (the gather the overlap leaves to the next forward is finished before a save)."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_pathmoe.config import ConfigError
from megatron_pathmoe.training.performance import PerformanceConfig, validate_performance
from tests.conftest import run_cli
from tests.distributed.test_data_parallel import TINY_ARGS

DISTOPT = ["--use-distributed-optimizer"]
OVERLAP = ["--overlap-grad-reduce", "--overlap-param-gather"]


def _run(demo_data, tmp_path, name: str, extra: list[str],
         nproc: int = 2) -> tuple[dict, dict]:
    """DP2 training (4 iterations) of test_data_parallel's tiny model, saved at the end."""
    save, summary = tmp_path / name, tmp_path / f"{name}.json"
    result = run_cli(["-m", "megatron_pathmoe.training.pretrain", *TINY_ARGS, *DISTOPT, *extra,
                      "--data-path", demo_data["train_prefix"],
                      "--valid-data-path", demo_data["valid_prefix"],
                      "--tokenizer-model", demo_data["tokenizer"],
                      "--summary-json", str(summary), "--save", str(save)], nproc=nproc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads(summary.read_text()), _checkpoint_tensors(save / "iter_0000004")


def _checkpoint_tensors(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint, read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = directory.parent / f"{directory.name}.pt"
    dcp_to_torch_save(str(directory), str(flat))
    out: dict[str, torch.Tensor] = {}

    def walk(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif torch.is_tensor(value):
                out[prefix + key] = value

    walk(torch.load(flat, weights_only=False))
    return out


@pytest.fixture(scope="module")
def baseline(demo_data, tmp_path_factory):
    return _run(demo_data, tmp_path_factory.mktemp("overlap_base"), "base", [])


def test_overlap_equals_no_overlap_bitwise(demo_data, tmp_path, baseline):
    """Default buckets (one per buffer at this size): the same reduce-scatters, only issued
    from the backward hooks and waited for later; the gathers run in the forward pre-hooks."""
    base, base_ckpt = baseline
    overlap, overlap_ckpt = _run(demo_data, tmp_path, "overlap", OVERLAP)
    assert len(base["train_losses"]) == 4
    assert overlap["train_losses"] == base["train_losses"]
    assert overlap["grad_norms"] == base["grad_norms"]
    assert overlap["valid_loss"] == base["valid_loss"]
    assert base["train_losses"][-1] < base["train_losses"][0]
    model = [k for k in base_ckpt if "decoder" in k or "embedding" in k]
    assert len(model) > 5 and base_ckpt.keys() == overlap_ckpt.keys()
    for key, value in base_ckpt.items():
        assert torch.equal(overlap_ckpt[key], value), key


def test_overlap_with_many_buckets(demo_data, tmp_path, baseline):
    """--ddp-bucket-size 5000 splits the parameters into dozens of buckets, so reduces and
    gathers really are in flight during compute. The shard boundaries follow the buckets, so
    the grad norm's partial sums (and, through clipping, the weights) differ by rounding."""
    base, base_ckpt = baseline
    overlap, overlap_ckpt = _run(demo_data, tmp_path, "buckets",
                                 [*OVERLAP, "--ddp-bucket-size", "5000"])
    assert overlap["train_losses"][0] == base["train_losses"][0]
    for a, b in zip(base["train_losses"], overlap["train_losses"]):
        assert a == pytest.approx(b, rel=1e-6)
    for a, b in zip(base["grad_norms"], overlap["grad_norms"]):
        assert a == pytest.approx(b, rel=2e-5)
    assert overlap["valid_loss"] == pytest.approx(base["valid_loss"], rel=1e-6)
    # The weights (the optimizer's state is stored per bucket, so its layout differs).
    for key, value in base_ckpt.items():
        if not key.startswith("optimizer."):
            torch.testing.assert_close(overlap_ckpt[key], value, rtol=0, atol=1e-5, msg=key)


def test_overlap_interleaved_pipeline(demo_data, tmp_path):
    """PP2 x VPP2 x DP2 (world 4): the interleaved schedule dispatches each chunk's gathers
    and reduces itself (config.param_sync_func / grad_sync_func, as Megatron-LM sets them)."""
    layout = ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size",
              "2", "--path-block-size", "1"]
    base, base_ckpt = _run(demo_data, tmp_path, "vpp", layout, nproc=4)
    overlap, overlap_ckpt = _run(demo_data, tmp_path, "vpp_overlap",
                                 [*layout, *OVERLAP, "--ddp-bucket-size", "5000"], nproc=4)
    assert overlap["train_losses"][0] == base["train_losses"][0]
    for a, b in zip(base["train_losses"], overlap["train_losses"]):
        assert a == pytest.approx(b, rel=1e-6)
    for a, b in zip(base["grad_norms"], overlap["grad_norms"]):
        assert a == pytest.approx(b, rel=2e-5)
    for key, value in base_ckpt.items():
        if not key.startswith("optimizer."):
            torch.testing.assert_close(overlap_ckpt[key], value, rtol=0, atol=1e-5, msg=key)
    # --no-align-*: the buckets' hooks start the same reduces and gathers the schedule did.
    unaligned, _ = _run(demo_data, tmp_path, "vpp_unaligned",
                        [*layout, *OVERLAP, "--ddp-bucket-size", "5000", "--no-align-grad-reduce",
                         "--no-align-param-gather"], nproc=4)
    assert unaligned["train_losses"] == overlap["train_losses"]
    assert unaligned["grad_norms"] == overlap["grad_norms"]


def test_no_align_grad_reduce_leaves_the_schedule_hook_unset():
    from types import SimpleNamespace

    from megatron_pathmoe.training.build import _wire_overlap

    ddp = SimpleNamespace(overlap_grad_reduce=True, overlap_param_gather=True,
                          align_param_gather=True)
    chunks = [SimpleNamespace(ddp_config=ddp, start_grad_sync=f"grad{i}",
                              start_param_sync=f"param{i}") for i in range(2)]
    for align, expected in ((True, ["grad0", "grad1"]), (False, None)):
        config = SimpleNamespace(grad_sync_func=None, param_sync_func=None)
        _wire_overlap(config, chunks, align)
        assert config.grad_sync_func == expected
        assert config.param_sync_func == ["param0", "param1"]


def test_no_align_flags_parse():
    from megatron_pathmoe.training.arguments import parse_args
    from megatron_pathmoe.training.performance import PerformanceConfig

    argv = ["--dry-run", "--dry-run-vocab-size", "128"]
    for extra, aligned in (([], (True, True)),
                           (["--no-align-grad-reduce", "--no-align-param-gather"],
                            (False, False))):
        _, train = parse_args(argv + extra)
        perf = train.performance
        assert isinstance(perf, PerformanceConfig)
        assert (perf.align_grad_reduce, perf.align_param_gather) == aligned


@pytest.mark.parametrize("perf, distopt, needle", [
    (PerformanceConfig(overlap_grad_reduce=True, overlap_param_gather=True), False,
     "needs --use-distributed-optimizer"),
    (PerformanceConfig(overlap_param_gather=True), True, "needs --overlap-grad-reduce"),
    (PerformanceConfig(ddp_bucket_size=0), False, "--ddp-bucket-size"),
])
def test_bad_overlap_flags_fail_in_one_line(perf, distopt, needle):
    with pytest.raises(ConfigError) as err:
        validate_performance(perf, distopt)
    assert needle in str(err.value) and "\n" not in str(err.value)
