"""The extension build: CUDA sources compile for sm_80/sm_90, labels track the sources, and the
build cache builds once for concurrent processes."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from megatron_pathmoe.ops import _build, extension


@pytest.mark.skipif(_build.find_nvcc() is None, reason="nvcc is not installed")
def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path):
    commands = _build._compile_commands(_build.CSRC, tmp_path, with_cuda=True, label="test")
    nvcc = [cmd for cmd in commands if cmd[0] == _build.find_nvcc()]
    assert nvcc and all("-gencode=arch=compute_80,code=sm_80" in cmd for cmd in nvcc)
    assert all("-gencode=arch=compute_90,code=sm_90" in cmd for cmd in nvcc)
    # The C++ side of a CUDA build (the bindings of the CUDA launchers) must compile as well.
    bindings = next(cmd for cmd in commands if cmd[-3].endswith("bindings.cpp"))
    for cmd in nvcc + [bindings[:-2] + ["-fsyntax-only"]]:
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    cuobjdump = shutil.which("cuobjdump")
    for cmd in nvcc if cuobjdump else []:  # not every CUDA install ships it
        dump = subprocess.run([cuobjdump, "--list-elf", cmd[-1]], capture_output=True, text=True)
        assert "sm_80" in dump.stdout and "sm_90" in dump.stdout, dump.stdout + dump.stderr


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
