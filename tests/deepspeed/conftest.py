"""tests/deepspeed runs only where the ``deepspeed`` extra is installed (CI installs it)."""

import pytest

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
