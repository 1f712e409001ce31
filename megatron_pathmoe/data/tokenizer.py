"""Megatron-compatible wrapper around a Hugging Face ``tokenizer.json``."""

from __future__ import annotations

import logging
import os
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer

from megatron_pathmoe.data.errors import DataError

try:  # megatron-core >= 0.14 renamed the dataset-side base class
    from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer as _MegatronBase
except ImportError:  # pragma: no cover - older megatron-core
    from megatron.core.datasets.megatron_tokenizer import MegatronTokenizer as _MegatronBase

EOD_TOKEN = "<|endoftext|>"
TOKENIZER_FLAG = "--tokenizer-model"
_BASE_LOGGER = logging.getLogger(_MegatronBase.__module__)


class _DropDeprecation(logging.Filter):
    # The base class warns about the "legacy" tokenizer system on every construction; the
    # datasets in megatron-core 0.16 still consume exactly this interface.
    def filter(self, record: logging.LogRecord) -> bool:
        return "legacy tokenizer" not in record.getMessage()


def _ids(ids: Iterable[int] | np.ndarray) -> list[int]:
    if hasattr(ids, "tolist"):  # numpy array or torch tensor
        ids = ids.tolist()
    return [int(i) for i in ids]


class PathMoETokenizer(_MegatronBase):
    """A ``tokenizers.Tokenizer`` exposed through megatron-core's dataset tokenizer interface.

    Args:
        hf_tokenizer: the loaded Hugging Face tokenizer.
        path: file it was loaded from (kept for messages and the dataset cache key).
        eod_id: id of the end-of-document token.
    """

    def __init__(self, hf_tokenizer: Tokenizer, path: str, eod_id: int) -> None:
        dropper = _DropDeprecation()
        _BASE_LOGGER.addFilter(dropper)
        try:
            super().__init__(path, eod_id=eod_id)
        finally:
            _BASE_LOGGER.removeFilter(dropper)
        self._tok = hf_tokenizer
        self.path = path
        self._eod = eod_id
        self._vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: t for t, i in self.vocab.items()}

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        # GPT convention: one token ends a document and a sequence.
        return self._eod

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tok.encode_batch(list(texts))]

    def detokenize(self, ids: Iterable[int] | np.ndarray) -> str:
        # Keep special tokens so detokenize(tokenize(x)) is exact even when x contains EOD.
        return self._tok.decode(_ids(ids), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"PathMoETokenizer(path={self.path!r}, vocab_size={self.vocab_size}, eod={self.eod})"


def _bad_file(path: str, reason: str) -> DataError:
    return DataError(
        f"cannot load tokenizer {path!r} (from {TOKENIZER_FLAG}): {reason}; pass the path of a "
        "Hugging Face tokenizer.json (the demo one is data/shakespeare/tokenizer.json, "
        "rebuilt by tools/make_demo_corpus.py)"
    )


def _resolve_eod(tok: Tokenizer, path: str, eod: str | int | None) -> int:
    if isinstance(eod, int):
        if not 0 <= eod < tok.get_vocab_size(with_added_tokens=True):
            raise DataError(f"EOD id {eod} is outside the vocabulary of tokenizer {path!r}")
        return eod
    name = EOD_TOKEN if eod is None else eod
    eod_id = tok.token_to_id(name)
    if eod_id is None:
        raise DataError(
            f"tokenizer {path!r} (from {TOKENIZER_FLAG}) has no end-of-document token {name!r}; "
            "add it as a special token when training the tokenizer, or pass eod=<token or id>"
        )
    return eod_id


def load_tokenizer(path: str | os.PathLike, eod: str | int | None = None) -> PathMoETokenizer:
    """Load a Hugging Face ``tokenizer.json``.

    Args:
        path: the tokenizer file (what ``--tokenizer-model`` names).
        eod: end-of-document token (string) or id; default ``<|endoftext|>``.

    Raises:
        DataError (a ValueError): the file is missing, unreadable, not a tokenizer, or lacks EOD.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise _bad_file(path, "no such file")
    if os.path.isdir(path):
        raise _bad_file(path, "is a directory, expected the tokenizer.json file itself")
    try:
        hf_tokenizer = Tokenizer.from_file(path)
    except Exception as err:  # tokenizers raises a bare Exception for every parse failure
        reason = " ".join(str(err).split()) or type(err).__name__
        raise _bad_file(path, f"not a valid tokenizer file ({reason})") from err
    return PathMoETokenizer(hf_tokenizer, path, _resolve_eod(hf_tokenizer, path, eod))
