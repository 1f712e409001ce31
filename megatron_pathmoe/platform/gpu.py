"""What a GPU cluster needs checked before training: the megatron-core actually imported, and
the transformer implementation that fits the machine.

The CPU platform (platform/cpu.py) and this project's workarounds of megatron-core internals
were written against megatron-core 0.16.1. Another version, e.g. a Megatron-LM checkout on
``PYTHONPATH`` whose ``megatron/core`` merges into the ``megatron`` namespace package ahead of
the installed one, would fail somewhere deep inside training; :func:`check_megatron_core` stops
at once with the version and location found. It reads ``megatron/core/package_info.py`` of the
package Python would import (without importing it: no torch, no seconds), or the version of
the one already imported.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from pathlib import Path

SUPPORTED_MEGATRON_CORE = "0.16.1"
ALLOW_ENV = "PATHMOE_ALLOW_ANY_MEGATRON_CORE"


class MegatronCoreVersionError(ImportError):
    """The megatron-core that would be imported is not the one this project supports."""


def _package_info_version(package_dir: Path) -> str:
    """``__version__`` of megatron/core/package_info.py, computed as that file does, from its
    literal MAJOR/MINOR/PATCH/PRE_RELEASE assignments."""
    values = {}
    tree = ast.parse((package_dir / "package_info.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Constant):
            values[node.targets[0].id] = node.value.value
    return ".".join(str(values[k]) for k in ("MAJOR", "MINOR", "PATCH")) + str(
        values.get("PRE_RELEASE", ""))


def megatron_core_found() -> tuple[str, str] | None:
    """(version, directory) of the megatron.core that is or would be imported; None when
    there is none. The version is "unknown" when its package_info.py cannot be read."""
    module = sys.modules.get("megatron.core")
    if module is not None and getattr(module, "__file__", None):
        return str(getattr(module, "__version__", "unknown")), str(Path(module.__file__).parent)
    try:
        spec = importlib.util.find_spec("megatron.core")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    directory = Path(list(spec.submodule_search_locations)[0])
    try:
        return _package_info_version(directory), str(directory)
    except (OSError, SyntaxError, KeyError):
        return "unknown", str(directory)


def check_megatron_core() -> None:
    """Raise MegatronCoreVersionError (one line: version and location found, what to do) when
    the megatron-core on the path is not SUPPORTED_MEGATRON_CORE. Absent megatron-core is left
    to the import that needs it; PATHMOE_ALLOW_ANY_MEGATRON_CORE=1 turns the check off (for
    porting to a newer release, at your own risk)."""
    if os.environ.get(ALLOW_ENV) == "1":
        return
    found = megatron_core_found()
    if found is None or found[0] == SUPPORTED_MEGATRON_CORE:
        return
    version, location = found
    raise MegatronCoreVersionError(
        f"megatron-pathmoe needs megatron-core {SUPPORTED_MEGATRON_CORE}, found {version} at "
        f"{location} (a Megatron-LM checkout on PYTHONPATH?): pip install "
        f"megatron-core=={SUPPORTED_MEGATRON_CORE} and remove the other one from the path, or "
        f"set {ALLOW_ENV}=1 to try anyway")


def transformer_engine_importable() -> bool:
    """transformer_engine.pytorch imports (on CPU machines it raises RuntimeError, not
    ImportError, so every exception means no)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - see the docstring
        return False
    return True


def default_transformer_impl(device: str = "auto") -> str:
    """``--transformer-impl`` default, as Megatron-LM's: "transformer_engine" when training on
    CUDA (``device`` "cuda", or "auto" with a GPU) and it imports, else "local"."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return "local"
    return "transformer_engine" if transformer_engine_importable() else "local"
