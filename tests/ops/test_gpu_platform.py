"""platform/gpu.py on CPU: the megatron-core version guard (the installed 0.16.1 passes, a
shadowing Megatron-LM checkout stops with its version and location, without importing it) and
the --transformer-impl default. (Here rather than in tests/platform: the GPU path's tests.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megatron_pathmoe.platform import gpu
from tests.conftest import REPO

CHECK = "from megatron_pathmoe.platform.gpu import check_megatron_core; check_megatron_core()"


def _checkout(tmp_path, version=(0, 17, 0), pre=""):
    """A Megatron-LM-like checkout: megatron/ without __init__ (a namespace portion, as in
    the wheel) whose core/__init__ would fail if the guard imported it."""
    core = tmp_path / "megatron" / "core"
    core.mkdir(parents=True)
    (core / "__init__.py").write_text("raise SystemExit('the guard must not import megatron.core')\n")
    (core / "package_info.py").write_text(
        "MAJOR = {}\nMINOR = {}\nPATCH = {}\nPRE_RELEASE = {!r}\nVERSION = (MAJOR, MINOR)\n"
        .format(*version, pre))
    return core


def _run(pythonpath: str, **env) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=pythonpath, **env)
    return subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env)


def test_installed_megatron_core_passes_without_being_imported():
    result = subprocess.run([sys.executable, "-c", CHECK + "; import sys; "
                             "assert 'megatron.core' not in sys.modules, 'imported'; "
                             "from megatron_pathmoe.platform.gpu import megatron_core_found; "
                             "print(megatron_core_found()[0])"],
                            capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == gpu.SUPPORTED_MEGATRON_CORE


def test_shadowing_checkout_stops_with_version_and_location(tmp_path):
    core = _checkout(tmp_path, (0, 17, 0), "rc0")
    result = _run(f"{tmp_path}{os.pathsep}{REPO}")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "needs megatron-core 0.16.1, found 0.17.0rc0 at " + str(core) in last
    assert gpu.ALLOW_ENV in last
    assert _run(f"{tmp_path}{os.pathsep}{REPO}", **{gpu.ALLOW_ENV: "1"}).returncode == 0


def test_same_version_checkout_passes(tmp_path):
    _checkout(tmp_path, (0, 16, 1))
    result = _run(f"{tmp_path}{os.pathsep}{REPO}")
    assert result.returncode == 0, result.stderr[-2000:]


def test_already_imported_megatron_core_is_the_one_checked(monkeypatch):
    import megatron.core

    assert gpu.megatron_core_found() == ("0.16.1", os.path.dirname(megatron.core.__file__))
    monkeypatch.setattr(megatron.core, "__version__", "0.15.0")
    with pytest.raises(gpu.MegatronCoreVersionError, match="found 0.15.0 at .*megatron/core"):
        gpu.check_megatron_core()


def test_unreadable_version_is_reported_as_unknown(tmp_path):
    core = _checkout(tmp_path)
    (core / "package_info.py").write_text("MAJOR = compute()\n")
    result = _run(f"{tmp_path}{os.pathsep}{REPO}")
    assert "found unknown at" in result.stderr


def test_default_transformer_impl(monkeypatch):
    import torch

    assert gpu.default_transformer_impl("cpu") == "local"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.default_transformer_impl("auto") == "local"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu, "transformer_engine_importable", lambda: True)
    assert gpu.default_transformer_impl("cuda") == "transformer_engine"
    assert gpu.default_transformer_impl("cpu") == "local"
    monkeypatch.setattr(gpu, "transformer_engine_importable", lambda: False)
    assert gpu.default_transformer_impl("auto") == "local"


def test_transformer_engine_that_raises_at_import_is_not_importable(tmp_path, monkeypatch):
    """As transformer-engine does on CPU machines: RuntimeError, not ImportError."""
    package = tmp_path / "transformer_engine"
    (package / "pytorch").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "pytorch" / "__init__.py").write_text("raise RuntimeError('no GPU found')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("transformer_engine")]:
        monkeypatch.delitem(sys.modules, name)
    assert gpu.transformer_engine_importable() is False


def test_gpu_extra_pins_transformer_engine_to_megatron_cores_range():
    import re
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    ours = re.search(r'"gpu": \["(transformer-engine[^"]*)"\]',
                     open(os.path.join(REPO, "setup.py"), encoding="utf-8").read())
    assert ours, "setup.py has no gpu extra with transformer-engine"
    theirs = [Requirement(r) for r in requires("megatron-core")
              if r.startswith("transformer-engine") and 'extra == "dev"' in r]
    assert theirs and Requirement(ours[1]).specifier == theirs[0].specifier


def _setup_env(python: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", os.path.join(REPO, "scripts", "setup_env.sh"), "--system-torch",
                           "--dry-run"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=python), timeout=300)


def test_setup_env_system_torch_keeps_the_installed_torch():
    import torch

    result = _setup_env(sys.executable)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"keeps torch {torch.__version__}" in result.stdout


def test_setup_env_system_torch_never_replaces_torch(tmp_path):
    """An installed torch outside the project's range (as a future NGC build would be): pip
    cannot keep it, so nothing is installed; and a Python without torch is refused."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\nif [ "$1" = -c ] && [ "$2" = "import torch; '
                    'print(torch.__version__)" ]; then echo 2.99.0a0+nv; exit 0; fi\n'
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    result = _setup_env(str(fake))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].endswith(
        "beside torch 2.99.0a0+nv (above); nothing was installed")
    no_torch = tmp_path / "python-no-torch"
    no_torch.write_text('#!/usr/bin/env bash\nif [ "$1" = -c ]; then exit 1; fi\n'
                        f'exec {sys.executable} "$@"\n')
    no_torch.chmod(0o755)
    result = _setup_env(str(no_torch))
    assert result.returncode == 1 and "has no torch; install your CUDA torch first" in result.stderr
