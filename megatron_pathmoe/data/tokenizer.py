"""Megatron-core's dataset tokenizer interface over a ``TextEncoder`` (see ``encoders.py``)."""

from __future__ import annotations

import logging
import os
from typing import Iterable, Sequence

import numpy as np

from megatron_pathmoe.data.encoders import (
    EOD_TOKEN,
    HF_TYPE,
    TextEncoder,
    TokenizerSpec,
    as_int_list,
)

try:  # megatron-core >= 0.14 renamed the dataset-side base class
    from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer as _MegatronBase
except ImportError:  # pragma: no cover - older megatron-core
    from megatron.core.datasets.megatron_tokenizer import MegatronTokenizer as _MegatronBase

__all__ = ["EOD_TOKEN", "PathMoETokenizer", "load_tokenizer"]
_BASE_LOGGER = logging.getLogger(_MegatronBase.__module__)


class _DropDeprecation(logging.Filter):
    # The base class warns about the "legacy" tokenizer system on every construction; the
    # datasets in megatron-core 0.16 still consume exactly this interface.
    def filter(self, record: logging.LogRecord) -> bool:
        return "legacy tokenizer" not in record.getMessage()


class PathMoETokenizer(_MegatronBase):
    """A text encoder exposed through megatron-core's dataset tokenizer interface.

    Args:
        encoder: the loaded encoder; its ``name`` (the tokenizer file) is kept as ``path``, which
            is also the dataset cache key.
    """

    def __init__(self, encoder: TextEncoder) -> None:
        dropper = _DropDeprecation()
        _BASE_LOGGER.addFilter(dropper)
        try:
            super().__init__(encoder.name, eod_id=encoder.eod)
        finally:
            _BASE_LOGGER.removeFilter(dropper)
        self.encoder = encoder
        self.path = encoder.name

    @property
    def vocab_size(self) -> int:
        return self.encoder.vocab_size

    @property
    def vocab(self) -> dict[str, int]:
        return self.encoder.vocab()

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: t for t, i in self.vocab.items()}

    @property
    def eod(self) -> int:
        return self.encoder.eod

    @property
    def eos(self) -> int:
        # GPT convention: one token ends a document and a sequence (Megatron-LM's legacy
        # SentencePieceTokenizer has both: eod <EOD>, eos the model's).
        return getattr(self.encoder, "eos", self.encoder.eod)

    @property
    def pad(self) -> int:
        """The id megatron-core's GPTDataset masks out of the loss (the SentencePiece types
        have one as in Megatron-LM, possibly -1); the others have none (megatron-core: -1)."""
        if not hasattr(self.encoder, "pad"):
            return super().pad  # raises NotImplementedError, as megatron-core expects
        return self.encoder.pad

    def tokenize(self, text: str) -> list[int]:
        return self.encoder.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encoder.encode_batch(texts)

    def detokenize(self, ids: Iterable[int] | np.ndarray) -> str:
        return self.encoder.decode(as_int_list(ids))

    def __repr__(self) -> str:
        return f"PathMoETokenizer(path={self.path!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def load_tokenizer(path: str | os.PathLike | TokenizerSpec,
                   eod: str | int | None = None) -> PathMoETokenizer:
    """Load a tokenizer for megatron-core's datasets.

    Args:
        path: a Hugging Face ``tokenizer.json`` (what ``--tokenizer-model`` names), or a
            ``TokenizerSpec`` for the other Megatron-LM tokenizer types.
        eod: end-of-document token (string) or id for a tokenizer.json; default
            ``<|endoftext|>``, else ``</s>``, ``<|end_of_text|>`` or ``<eos>``.

    Raises:
        DataError (a ValueError): the file is missing, unreadable, not a tokenizer, or lacks EOD.
    """
    spec = (path if isinstance(path, TokenizerSpec)
            else TokenizerSpec(HF_TYPE, os.fspath(path), eod=eod))
    return PathMoETokenizer(spec.load())
