"""The one error type of the converter."""

from __future__ import annotations


class ConversionError(ValueError):
    """A model or directory that cannot be converted exactly; the message names the file, key or
    routing variant and what to do."""
