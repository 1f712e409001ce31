"""The extension build: CUDA architectures as torch's extensions read TORCH_CUDA_ARCH_LIST (the
CUDA sources compile for the default sm_80, sm_90 + PTX), a GPU without a kernel image is named
at load, labels track the sources, and the build cache builds once for concurrent processes."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import logging
from types import SimpleNamespace

import pytest
import torch

from megatron_pathmoe.ops import _build, dispatcher, extension, install_permute_impl


@pytest.mark.parametrize("value,archs", [
    (None, ("80", "90+PTX")),
    ("8.0;9.0+PTX", ("80", "90+PTX")),
    ("8.6 9.0", ("86", "90")),
    ("7.5;8.0 ;9.0a+PTX;;", ("75", "80", "90a+PTX")),
    ("Ampere;Hopper", ("80", "86+PTX", "90+PTX")),
    ("10.0+PTX", ("100+PTX",)),
])
def test_arch_list_is_read_like_torch_extensions(monkeypatch, value, archs):
    monkeypatch.delenv(_build.CUDA_ARCH_ENV, raising=False)
    if value is not None:
        monkeypatch.setenv(_build.CUDA_ARCH_ENV, value)
    assert _build.cuda_archs() == archs


def test_arch_flags_and_label_follow_the_list(monkeypatch):
    assert _build.nvcc_arch_flags(("80", "90+PTX")) == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90"]
    monkeypatch.delenv(_build.CUDA_ARCH_ENV, raising=False)
    default = _build.build_hash(True)
    monkeypatch.setenv(_build.CUDA_ARCH_ENV, "8.6")
    assert _build.build_hash(True) != default  # another list is another build
    assert _build.build_hash(False) == _build.build_hash(False)


@pytest.mark.parametrize("value", ["sm_90", "9", "9.0+ptx", "Hoper", ";"])
def test_bad_arch_list_is_named(monkeypatch, value):
    monkeypatch.setenv(_build.CUDA_ARCH_ENV, value)
    with pytest.raises(_build.BuildError, match="TORCH_CUDA_ARCH_LIST"):
        _build.cuda_archs()


@pytest.mark.parametrize("archs,capability,runs", [
    ("80;90+PTX", (8, 0), True),
    ("80;90+PTX", (8, 6), True),    # sm_80 SASS runs on 8.x
    ("80;90+PTX", (9, 0), True),
    ("80;90+PTX", (10, 0), True),   # PTX of 9.0, JIT-compiled
    ("80;90+PTX", (12, 0), True),
    ("80;90+PTX", (7, 5), False),   # older than anything built
    ("80;90", (10, 0), False),      # no PTX: no image for Blackwell
    ("90a", (9, 0), True),
    ("90a", (10, 0), False),        # arch-specific SASS runs only on its own architecture
    ("86", (8, 0), False),
])
def test_kernel_image_for_a_capability(archs, capability, runs):
    problem = _build.arch_problem(archs, capability)
    assert (problem is None) == runs, problem
    if not runs:
        assert f"compute capability {capability[0]}.{capability[1]}" in problem
        assert "TORCH_CUDA_ARCH_LIST" in problem


def test_missing_arch_is_reported_at_install_with_the_capability(monkeypatch, caplog):
    """A CUDA build for sm_80/sm_90 without PTX on a (fake) Blackwell GPU: auto names the
    capability and uses megatron-core, custom refuses."""
    fake = extension.Extension(SimpleNamespace(has_cuda=True, cuda_archs="80;90"))
    monkeypatch.setattr(dispatcher, "load_extension", lambda: fake)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    try:
        with caplog.at_level(logging.WARNING):
            assert install_permute_impl("auto", device="cuda") == "megatron"
        assert "compute capability 10.0" in caplog.text
        assert "compute capability 10.0" in dispatcher.permute_impl_report()["fallback_reason"]
        with pytest.raises(RuntimeError, match="--permute-impl custom.*capability 10.0"):
            install_permute_impl("custom", device="cuda")
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        assert install_permute_impl("auto", device="cuda:0") == "custom"
    finally:
        install_permute_impl("megatron")


def test_bad_arch_list_leaves_the_cpu_kernels(monkeypatch):
    """An invalid TORCH_CUDA_ARCH_LIST must not take the CPU kernels down with it."""
    monkeypatch.setenv(_build.CUDA_ARCH_ENV, "sm_90")
    assert _build.build_hash(False) in extension._current_labels(with_cuda=False)


@pytest.mark.skipif(_build.find_nvcc() is None, reason="nvcc is not installed")
def test_cuda_sources_compile_for_sm80_and_sm90_with_ptx(tmp_path, monkeypatch):
    monkeypatch.delenv(_build.CUDA_ARCH_ENV, raising=False)
    commands = _build._compile_commands(_build.CSRC, tmp_path, with_cuda=True, label="test")
    nvcc = [cmd for cmd in commands if cmd[0] == _build.find_nvcc()]
    assert nvcc and all("-gencode=arch=compute_80,code=sm_80" in cmd for cmd in nvcc)
    assert all("-gencode=arch=compute_90,code=sm_90" in cmd for cmd in nvcc)
    assert all("-gencode=arch=compute_90,code=compute_90" in cmd for cmd in nvcc)
    # The C++ side of a CUDA build (the bindings of the CUDA launchers) must compile as well.
    bindings = next(cmd for cmd in commands if cmd[-3].endswith("bindings.cpp"))
    for cmd in nvcc + [bindings[:-2] + ["-fsyntax-only"]]:
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    cuobjdump = shutil.which("cuobjdump")
    for cmd in nvcc if cuobjdump else []:  # not every CUDA install ships it
        dump = subprocess.run([cuobjdump, "--list-elf", cmd[-1]], capture_output=True, text=True)
        assert "sm_80" in dump.stdout and "sm_90" in dump.stdout, dump.stdout + dump.stderr
        ptx = subprocess.run([cuobjdump, "--list-ptx", cmd[-1]], capture_output=True, text=True)
        assert "sm_90" in ptx.stdout and "sm_80" not in ptx.stdout, ptx.stdout + ptx.stderr


def test_loaded_extension_matches_sources():
    module = extension.load_extension().module
    assert module is not None, extension.load_extension().reason
    assert module.build_hash == _build.build_hash(module.has_cuda)


def test_build_label_tracks_every_source(tmp_path):
    listed = set(_build.CPU_SOURCES + _build.HEADERS + _build.CUDA_SOURCES)
    assert {p.name for p in _build.CSRC.iterdir()} == listed  # a new file must be listed
    csrc = tmp_path / "csrc"
    shutil.copytree(_build.CSRC, csrc)
    before = _build.build_hash(False, csrc)
    assert before == _build.build_hash(False, _build.CSRC)
    (csrc / "cpu_dtypes.h").write_text((csrc / "cpu_dtypes.h").read_text() + "\n// edit\n")
    assert _build.build_hash(False, csrc) != before
    assert _build.build_hash(True, _build.CSRC) != _build.build_hash(False, _build.CSRC)


def test_concurrent_first_use_builds_once(tmp_path, monkeypatch):
    """torchrun ranks starting together: one builds under the lock, the others wait and load."""
    built = extension.load_extension().module.__file__
    calls = []
    lock = threading.Lock()

    def slow_build(target, with_cuda):
        with lock:
            calls.append(target)
        time.sleep(0.5)
        shutil.copy(built, target)

    monkeypatch.setenv("PATHMOE_OPS_BUILD_DIR", str(tmp_path))
    monkeypatch.setattr(_build, "build_extension", slow_build)
    with ThreadPoolExecutor(max_workers=3) as pool:
        modules = list(pool.map(lambda _: extension._build_cached(False), range(3)))
    assert len(calls) == 1
    assert {m.build_hash for m in modules} == {_build.build_hash(False)}
    # A later process finds the file and does not build again.
    extension._build_cached(False)
    assert len(calls) == 1


def test_build_failure_is_reported_not_raised(tmp_path, monkeypatch):
    monkeypatch.setenv("PATHMOE_OPS_BUILD_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(extension, "_installed", lambda with_cuda: None)
    extension.load_extension.cache_clear()
    try:
        result = extension.load_extension()
        assert result.module is None and "compiler not found" in result.reason
    finally:
        extension.load_extension.cache_clear()


def test_kernels_called_on_a_gpu_without_an_image_name_its_capability(monkeypatch):
    from megatron_pathmoe.ops import _kernels

    fake = extension.Extension(SimpleNamespace(has_cuda=True, cuda_archs="80;90"))
    monkeypatch.setattr(_kernels, "load_extension", lambda: fake)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    _kernels._check_arch.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="cuda:0: .*compute capability 7.5"):
            _kernels._Backend(torch.device("cuda", 0))
    finally:
        _kernels._check_arch.cache_clear()
