"""Text encoders for Megatron-LM's tokenizer types, without importing megatron-core or torch.

``TokenizerSpec`` names a tokenizer the way Megatron-LM's flags do (``--tokenizer-type``,
``--tokenizer-model``, ``--vocab-file``, ``--merge-file``); it is small and picklable, so worker
processes rebuild the encoder from it. ``TextEncoder`` is what preprocessing, inspection and
``PathMoETokenizer`` (the megatron-core-facing wrapper) use.

Ids follow Megatron-LM's tokenizers:

- ``HuggingFaceTokenizer``: a ``tokenizer.json`` (or a folder holding one); ids are
  ``Tokenizer.encode(text).ids``, special tokens in the text are matched.
- ``GPT2BPETokenizer``: GPT-2 ``vocab.json`` + ``merges.txt``: byte-level BPE with the GPT-2
  split pattern and no special-token matching (``<|endoftext|>`` in the text is plain text), as
  Megatron's pure-Python GPT-2 BPE; EOD is ``<|endoftext|>``.
- SentencePiece types (a ``.model``), as Megatron-LM core_v0.16.1 builds them. By default it
  builds every one of them through megatron-core's tokenizer system (``megatron.core.tokenizers``,
  used by ``tools/preprocess_data.py`` unless ``--legacy-tokenizer``): ids are
  ``encode_as_ids(text)``, EOD is the model's eos id, the vocabulary is the model's pieces.
  With ``--legacy-tokenizer`` it uses ``megatron/training/tokenizer``'s classes:

  - ``GPTSentencePieceTokenizer``: the same as the default.
  - ``SentencePieceTokenizer``: ids past the pieces for ``<CLS>``, ``<SEP>``, ``<EOD>``,
    ``<MASK>``, then ``<PAD>``/``<BOS>``/``<EOS>`` where the model has no pad/bos/eos piece (a
    piece that exists keeps its id), in that order; EOD is ``<EOD>``. These special tokens (the
    model's own pad/bos/eos pieces included) are matched in the text: the text between them is
    encoded piece by piece, the earliest match first (at equal positions, the one added
    first); detokenize writes each as `` <TOKEN> `` between the decoded pieces.
  - ``Llama2Tokenizer``: every text starts with the model's BOS id; EOD is its eos id.

  ``--legacy-tokenizer`` changes nothing for the other types here.
- ``NullTokenizer``: no file; ``--vocab-size N``. Text is token ids separated by single spaces,
  EOD is id N and the vocabulary N + 1 ids, as Megatron's ``_NullTokenizer``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

from megatron_pathmoe.data.errors import DataError

HF_TYPE = "HuggingFaceTokenizer"
GPT2_TYPE = "GPT2BPETokenizer"
SPM_TYPES = ("GPTSentencePieceTokenizer", "SentencePieceTokenizer")
LLAMA2_TYPE = "Llama2Tokenizer"
NULL_TYPE = "NullTokenizer"
TOKENIZER_TYPES = (HF_TYPE, GPT2_TYPE) + SPM_TYPES + (LLAMA2_TYPE, NULL_TYPE)
# The types --legacy-tokenizer changes (Megatron-LM's legacy classes differ from megatron-core's).
LEGACY_TYPES = ("SentencePieceTokenizer", LLAMA2_TYPE)
# The spec fields that name files, and their flags.
FILE_FLAGS = {"tokenizer_model": "--tokenizer-model", "vocab_file": "--vocab-file",
              "merge_file": "--merge-file"}
EOD_TOKEN = "<|endoftext|>"
# Tried in order when a tokenizer.json is given without an explicit EOD token.
EOD_CANDIDATES = (EOD_TOKEN, "</s>", "<|end_of_text|>", "<eos>")


class TextEncoder(Protocol):
    """What preprocessing needs from a tokenizer."""

    name: str  # the file it was loaded from (for messages and cache keys)
    eod: int
    vocab_size: int

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def vocab(self) -> dict[str, int]: ...


@dataclass(frozen=True)
class TokenizerSpec:
    """A tokenizer named by Megatron-LM's flags; ``load()`` builds its encoder.

    ``eod``: end-of-document token (string) or id; default: ``<|endoftext|>`` (then ``</s>``,
    ``<|end_of_text|>``, ``<eos>`` for a tokenizer.json), the eos id for SentencePiece.
    ``vocab_size``: ``--vocab-size`` (NullTokenizer only). ``legacy``: ``--legacy-tokenizer``
    (Megatron-LM's legacy SentencePieceTokenizer and Llama2Tokenizer).
    """

    tokenizer_type: str = HF_TYPE
    tokenizer_model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    eod: str | int | None = None
    vocab_size: int | None = None
    legacy: bool = False

    def __post_init__(self) -> None:
        # Only two types have a legacy variant; elsewhere the flag is a no-op, so that records
        # and comparisons of the same tokenizer never differ by it.
        legacy = bool(self.legacy) and self.tokenizer_type in LEGACY_TYPES
        object.__setattr__(self, "legacy", legacy)

    def load(self) -> TextEncoder:
        files = self.files()
        if self.tokenizer_type == HF_TYPE:
            return HFEncoder.from_tokenizer_json(files["tokenizer_model"], self.eod)
        if self.tokenizer_type == GPT2_TYPE:
            return HFEncoder.from_gpt2_files(files["vocab_file"], files["merge_file"], self.eod)
        if self.tokenizer_type == NULL_TYPE:
            return NullEncoder(self.vocab_size, self.eod)
        encoder = LEGACY_SPM_ENCODERS[self.tokenizer_type] if self.legacy else SentencePieceEncoder
        return encoder(files["tokenizer_model"], self.eod)

    def files(self) -> dict[str, str]:
        """The files this type reads, by spec field (a tokenizer.json folder resolved to the
        file); raises ``DataError`` naming the flag of a missing one."""
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise DataError(
                f"--tokenizer-type {self.tokenizer_type!r} is not supported; choose one of "
                f"{', '.join(TOKENIZER_TYPES)}")
        if self.tokenizer_type == NULL_TYPE:
            return {}
        names = (("vocab_file", "merge_file") if self.tokenizer_type == GPT2_TYPE
                 else ("tokenizer_model",))
        return {name: self._file(FILE_FLAGS[name], getattr(self, name)) for name in names}

    def with_files(self, files: dict[str, str]) -> "TokenizerSpec":
        """The same tokenizer read from other copies of its files (e.g. a checkpoint's)."""
        return dataclasses.replace(self, **files)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> "TokenizerSpec":
        return cls(**{f.name: record.get(f.name) for f in dataclasses.fields(cls)
                      if f.name in record})

    def _file(self, flag: str, path: str | None) -> str:
        if not path:
            raise DataError(f"--tokenizer-type {self.tokenizer_type} needs {flag}")
        if not os.path.exists(path):
            raise tokenizer_file_error(flag, path, "no such file")
        if os.path.isdir(path):
            inner = os.path.join(path, "tokenizer.json")
            if self.tokenizer_type == HF_TYPE and os.path.isfile(inner):
                return inner
            raise tokenizer_file_error(flag, path,
                                       "is a directory, expected the tokenizer file itself")
        return path


def add_tokenizer_arguments(group: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The Megatron-LM tokenizer flags, on an argparse parser or argument group."""
    group.add_argument("--tokenizer-type", default=HF_TYPE,
                       help=f"one of {', '.join(TOKENIZER_TYPES)} (default: {HF_TYPE})")
    group.add_argument("--tokenizer-model",
                       help="tokenizer.json (or its folder), or SentencePiece .model")
    group.add_argument("--vocab-file", help="GPT-2 vocab.json (GPT2BPETokenizer)")
    group.add_argument("--merge-file", help="GPT-2 merges.txt (GPT2BPETokenizer)")
    group.add_argument("--eod-token", help="end-of-document token or id (default: <|endoftext|>, "
                                           "</s>, <|end_of_text|>, <eos>; the SentencePiece eos)")
    # Absent unless given, so a command line that shares its namespace with PathMoEConfig's
    # fields (pathmoe-pretrain) never sets the model's vocabulary to None.
    group.add_argument("--vocab-size", type=int, default=argparse.SUPPRESS,
                       help="NullTokenizer: ids below N are tokens, N is the end of document "
                            "(vocabulary N + 1)")
    group.add_argument("--legacy-tokenizer", action="store_true",
                       help="Megatron-LM's legacy tokenizer classes: SentencePieceTokenizer adds "
                            "<CLS> <SEP> <EOD> <MASK> (...) past the pieces and ends documents "
                            "with <EOD>; Llama2Tokenizer puts BOS before every text")


def spec_from_arguments(args: argparse.Namespace) -> TokenizerSpec | None:
    """The ``TokenizerSpec`` the flags of ``add_tokenizer_arguments`` name; None when no file is
    given (a NullTokenizer needs none)."""
    if not (args.tokenizer_model or args.vocab_file or args.merge_file
            or args.tokenizer_type == NULL_TYPE):
        return None
    eod = int(args.eod_token) if args.eod_token and args.eod_token.isdigit() else args.eod_token
    return TokenizerSpec(args.tokenizer_type, args.tokenizer_model, args.vocab_file,
                         args.merge_file, eod, getattr(args, "vocab_size", None),
                         args.legacy_tokenizer)


def tokenizer_file_error(flag: str, path: str, reason: str) -> DataError:
    return DataError(
        f"cannot load tokenizer {path!r} (from {flag}): {reason}; pass a Hugging Face "
        "tokenizer.json (the demo one is data/shakespeare/tokenizer.json), GPT-2 --vocab-file/"
        "--merge-file or a SentencePiece .model matching --tokenizer-type"
    )


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


class HFEncoder:
    """A Hugging Face ``tokenizers.Tokenizer`` (tokenizer.json, or GPT-2 files) with an EOD id."""

    def __init__(self, tokenizer, name: str, eod: int, flag: str = "--tokenizer-model") -> None:
        self._tok = tokenizer
        self.name = name
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        if not 0 <= eod < self.vocab_size:
            raise DataError(f"EOD id {eod} is outside the vocabulary of tokenizer {name!r} "
                            f"(from {flag})")
        self.eod = eod
        # No offsets: ~1.4x faster than encode_batch (tokenizers >= 0.20), same ids.
        self._encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)

    @classmethod
    def from_tokenizer_json(cls, path: str, eod: str | int | None = None) -> "HFEncoder":
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(path)
        except Exception as err:  # tokenizers raises a bare Exception for every parse failure
            raise tokenizer_file_error("--tokenizer-model", path,
                                       f"not a valid tokenizer file ({_one_line(err)})") from err
        return cls(tok, path, _eod_id(tok.token_to_id, path, eod, "--tokenizer-model"))

    @classmethod
    def from_gpt2_files(cls, vocab_file: str, merge_file: str,
                        eod: str | int | None = None) -> "HFEncoder":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        try:
            bpe = models.BPE.from_file(vocab_file, merge_file)
        except Exception as err:
            reason = f"not a GPT-2 vocab.json + merges.txt pair ({_one_line(err)})"
            raise tokenizer_file_error("--vocab-file/--merge-file", vocab_file, reason) from err
        tok = Tokenizer(bpe)
        # ByteLevel's regex is GPT-2's split pattern; no added tokens, so none is matched.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        eod_id = _eod_id(tok.token_to_id, vocab_file, eod or EOD_TOKEN, "--vocab-file")
        return cls(tok, vocab_file, eod_id, flag="--vocab-file")

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self._encode(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        # Keep special tokens so decode(encode(x)) is exact even when x contains EOD.
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def save_json(self, path: str) -> None:
        """Write the tokenizer as a Hugging Face tokenizer.json (same ids)."""
        self._tok.save(path)


def _eod_id(token_to_id, path: str, eod: str | int | None, flag: str) -> int:
    if isinstance(eod, int):
        return eod
    names = EOD_CANDIDATES if eod is None else (eod,)
    for name in names:
        eod_id = token_to_id(name)
        if eod_id is not None:
            return eod_id
    raise DataError(
        f"tokenizer {path!r} (from {flag}) has no end-of-document token (tried "
        f"{', '.join(names)}); add one as a special token when training the tokenizer, or name "
        "it with --eod-token"
    )


class SentencePieceEncoder:
    """A SentencePiece ``.model``: ids are its pieces, EOD its eos id (Megatron-LM's default
    tokenizer system for every SentencePiece type, and its legacy GPTSentencePieceTokenizer)."""

    def __init__(self, path: str, eod: str | int | None = None) -> None:
        try:
            import sentencepiece
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise DataError(
                "SentencePiece tokenizer types need the sentencepiece package: "
                "pip install sentencepiece"
            ) from err
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except Exception as err:
            reason = f"not a SentencePiece model ({_one_line(err)})"
            raise tokenizer_file_error("--tokenizer-model", path, reason) from err
        self.name = path
        self._vocab = self._build_vocab()
        self.vocab_size = len(self._vocab)
        self.eod = self._eod_id(eod)
        # What Megatron-LM's tokenizer gives megatron-core's GPTDataset as pad (labels with this
        # id get no loss); -1: none.
        self.pad = self._sp.pad_id()

    def _build_vocab(self) -> dict[str, int]:
        return {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}

    def _piece(self, piece_id: int) -> str | None:
        """The piece of a special id of the model (pad, bos, eos); None when it has none."""
        return self._sp.id_to_piece(piece_id) if 0 <= piece_id < self._sp.get_piece_size() \
            else None

    def _default_eod(self) -> int:
        if self._piece(self._sp.eos_id()) is None:
            raise DataError(f"SentencePiece model {self.name!r} (from --tokenizer-model) has no "
                            "eos piece; name the end-of-document piece with --eod-token")
        return self._sp.eos_id()

    def _eod_id(self, eod: str | int | None) -> int:
        if eod is None:
            eod = self._default_eod()
        elif isinstance(eod, str):
            if eod not in self._vocab:
                raise DataError(f"SentencePiece tokenizer {self.name!r} has no piece {eod!r} "
                                "(from --eod-token)")
            eod = self._vocab[eod]
        if not 0 <= eod < self.vocab_size:
            raise DataError(f"EOD id {eod} is outside the vocabulary of tokenizer {self.name!r}")
        return int(eod)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # One thread: parallelism comes from the worker processes.
        return self._sp.encode(list(texts), out_type=int, num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def vocab(self) -> dict[str, int]:
        return dict(self._vocab)


class LegacySentencePieceEncoder(SentencePieceEncoder):
    """Megatron-LM's legacy ``SentencePieceTokenizer`` (``--legacy-tokenizer``): special tokens
    past the pieces, matched in the text; EOD is ``<EOD>``."""

    def __init__(self, path: str, eod: str | int | None = None) -> None:
        super().__init__(path, eod)
        pad, _, eos = self._model_tokens()
        self.pad, self.eos = self._vocab[pad], self._vocab[eos]

    def _build_vocab(self) -> dict[str, int]:
        vocab = super()._build_vocab()
        # Insertion order matters: it breaks ties between matches at one position.
        self.special_tokens: dict[str, int] = {}
        for token in ("<CLS>", "<SEP>", "<EOD>", "<MASK>", *self._model_tokens()):
            self.special_tokens[token] = vocab.setdefault(token, len(vocab))
        self._special_of_id = {i: token for token, i in self.special_tokens.items()}
        return vocab

    def _model_tokens(self) -> tuple[str, str, str]:
        """pad, bos, eos: the model's pieces, or <PAD>, <BOS>, <EOS> where it has none."""
        ids = (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id())
        return tuple(self._piece(i) or fallback for i, fallback in zip(ids, ("<PAD>", "<BOS>",
                                                                             "<EOS>")))

    def _default_eod(self) -> int:
        return self.special_tokens["<EOD>"]

    def _encode(self, text: str) -> list[int]:
        ids: list[int] = []
        start = 0
        while True:
            found = {t: text.find(t, start) for t in self.special_tokens}
            found = {t: at for t, at in found.items() if at >= 0}
            if not found:
                return ids + self._sp.encode_as_ids(text[start:])
            token = min(found, key=found.get)  # the earliest; at a tie the first added
            ids += self._sp.encode_as_ids(text[start:found[token]])
            ids.append(self.special_tokens[token])
            start = found[token] + len(token)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self._encode(text) if any(t in text for t in self.special_tokens)
                else ids for text, ids in zip(texts, super().encode_batch(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        text, start = "", 0
        for i, token_id in enumerate(ids):
            if token_id in self._special_of_id:
                text += f"{self._sp.decode_ids(ids[start:i])} {self._special_of_id[token_id]} "
                start = i + 1
        return text + self._sp.decode_ids(ids[start:])


class Llama2Encoder(SentencePieceEncoder):
    """Megatron-LM's legacy ``Llama2Tokenizer`` (``--legacy-tokenizer``): the model's BOS id
    starts every text; EOD is its eos."""

    def __init__(self, path: str, eod: str | int | None = None) -> None:
        super().__init__(path, eod)
        self.bos = self._sp.bos_id()
        if self._piece(self.bos) is None:
            raise DataError(f"SentencePiece model {path!r} (from --tokenizer-model) has no bos "
                            "piece, which --tokenizer-type Llama2Tokenizer --legacy-tokenizer "
                            "puts before every text; use GPTSentencePieceTokenizer")
        self.pad = -1  # Megatron-LM's legacy Llama2Tokenizer has no pad: megatron-core uses -1

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [[self.bos] + ids for ids in super().encode_batch(texts)]


LEGACY_SPM_ENCODERS = dict(zip(LEGACY_TYPES, (LegacySentencePieceEncoder, Llama2Encoder)))


class NullEncoder:
    """Megatron's ``NullTokenizer``: text is token ids separated by single spaces; ids below
    ``--vocab-size`` N are tokens, N is the end of document, so the vocabulary is N + 1."""

    def __init__(self, vocab_size: int | None, eod: str | int | None = None) -> None:
        if vocab_size is None or vocab_size < 1:
            raise DataError("--tokenizer-type NullTokenizer needs --vocab-size N (N >= 1: the "
                            "number of token ids; N itself is the end of document)")
        if eod is not None and eod != vocab_size:
            raise DataError(f"--eod-token {eod!r}: a NullTokenizer's end of document is "
                            f"--vocab-size ({vocab_size}); drop --eod-token")
        self.name = f"NullTokenizer(vocab_size={vocab_size})"
        self.eod = vocab_size
        self.vocab_size = vocab_size + 1

    def _ids(self, text: str) -> list[int]:
        try:
            ids = [int(x) for x in text.split(" ")]
        except ValueError:
            raise DataError("NullTokenizer reads token ids separated by single spaces; this "
                            f"text is not ({text[:40]!r})") from None
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise DataError(f"token id {bad[0]} is outside the NullTokenizer's vocabulary "
                            f"(--vocab-size {self.eod}: ids 0..{self.eod})")
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self._ids(text) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def vocab(self) -> dict[str, int]:
        return {str(i): i for i in range(self.vocab_size)}


def as_int_list(ids: Iterable[int]) -> list[int]:
    """numpy arrays and torch tensors -> list of Python ints."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]
