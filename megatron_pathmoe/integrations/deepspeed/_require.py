"""The one place that imports deepspeed, with a one-line error when the extra is missing."""

from __future__ import annotations

import importlib
from types import ModuleType


def require_deepspeed(module: str = "deepspeed") -> ModuleType:
    """Import ``module`` (deepspeed or one of its sub-modules) or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{module} is not importable ({error}); install the extra: "
            "DS_BUILD_OPS=0 pip install -e '.[deepspeed]'") from error
