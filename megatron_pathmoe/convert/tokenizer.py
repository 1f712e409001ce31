"""The Hugging Face tokenizer files of an exported model, for each Megatron-LM tokenizer type.

- ``HuggingFaceTokenizer``: the checkpoint's tokenizer.json, as a ``PreTrainedTokenizerFast``.
- ``GPT2BPETokenizer``: vocab.json + merges.txt written as the tokenizer.json that training
  encoded with (byte-level BPE, GPT-2 split pattern), as a ``PreTrainedTokenizerFast``.
- ``SentencePieceTokenizer``/``GPTSentencePieceTokenizer``/``Llama2Tokenizer``: the .model as
  ``tokenizer.model`` plus transformers' ``LlamaTokenizer`` conversion of it (offline), which
  puts BOS before every text for ``Llama2Tokenizer --legacy-tokenizer`` only, as Megatron-LM
  does. The conversion turns SentencePiece's piece scores into BPE merges; it can split a run of
  spaces differently. Hugging Face matches the model's ``<unk>``, ``<s>``, ``</s>`` written in a
  text as special tokens, which Megatron-LM does only for ``<s>``/``</s>`` of a legacy
  ``SentencePieceTokenizer``.
- ``SentencePieceTokenizer --legacy-tokenizer``: its ids past the pieces (``<CLS>``, ``<SEP>``,
  ``<EOD>``, ``<MASK>``, ``<PAD>``...) become added special tokens with the same ids, matched in
  text, each segment between them starting a word as Megatron-LM encodes them (except a
  segment that begins with a space: Hugging Face's Metaspace adds no word start there, where
  SentencePiece adds one); decoding writes them without the spaces Megatron-LM's detokenize
  puts around them.
- ``NullTokenizer``: ids are the text, so no tokenizer is written; the weights and config
  (end of document = ``--vocab-size``) are.

In every case the end-of-document token is the model's eos and pad token. The Megatron files
(vocab.json + merges.txt, tokenizer.model) are kept beside the Hugging Face ones and
``config.json`` records the type (``pathmoe.tokenizer``), so the way back (to-megatron)
restores the same tokenizer, NullTokenizer included.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

from megatron_pathmoe.convert import hf_files
from megatron_pathmoe.convert.errors import ConversionError
from megatron_pathmoe.data.encoders import (
    GPT2_TYPE,
    HF_TYPE,
    NULL_TYPE,
    TextEncoder,
    TokenizerSpec,
)

SPM_FILE = "tokenizer.model"
# Where the Megatron tokenizer files go in the Hugging Face directory, by TokenizerSpec field.
MEGATRON_FILES = {"vocab_file": "vocab.json", "merge_file": "merges.txt"}


@dataclass(frozen=True)
class ExportedTokenizer:
    bos: int | None  # a Llama2Tokenizer's BOS id; None: the end of document serves as bos
    eod: int
    record: dict  # config.json's pathmoe.tokenizer: type, eod, vocab_size, files


def write_hf_tokenizer(spec: TokenizerSpec, out_dir: str,
                       model_max_length: int) -> ExportedTokenizer:
    """Write the tokenizer files of ``spec`` into ``out_dir`` (none for a NullTokenizer)."""
    encoder = spec.load()
    files = {name: MEGATRON_FILES.get(name, SPM_FILE if spec.tokenizer_type != HF_TYPE
                                       else hf_files.TOKENIZER_FILE)
             for name in spec.files()}
    exported = ExportedTokenizer(getattr(encoder, "bos", None), encoder.eod, {
        "type": spec.tokenizer_type, "eod": spec.eod, "vocab_size": spec.vocab_size,
        "legacy": spec.legacy, "files": files})
    if spec.tokenizer_type == NULL_TYPE:
        return exported
    eod_token = {i: t for t, i in encoder.vocab().items()}[encoder.eod]
    if spec.tokenizer_type == HF_TYPE:
        hf_files.write_tokenizer(spec.files()["tokenizer_model"], out_dir, eod_token,
                                 model_max_length)
    elif spec.tokenizer_type == GPT2_TYPE:
        _write_gpt2(encoder, out_dir, eod_token, model_max_length)
    else:
        _write_sentencepiece(spec, encoder, out_dir, eod_token, model_max_length)
    for name, path in spec.files().items():
        if name in MEGATRON_FILES:
            shutil.copyfile(path, os.path.join(out_dir, MEGATRON_FILES[name]))
    return exported


def hf_tokenizer_spec(hf_dir: str, record: dict | None) -> TokenizerSpec:
    """The tokenizer of a Hugging Face directory for a megatron checkpoint: the one
    ``config.json`` records (an exported checkpoint's), else its tokenizer.json."""
    if record is None:
        path = os.path.join(hf_dir, hf_files.TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise ConversionError(f"{hf_dir!r} has no {hf_files.TOKENIZER_FILE}; megatron "
                                  "checkpoints carry the tokenizer, so the model directory "
                                  "needs one")
        return TokenizerSpec(HF_TYPE, path)
    files = {name: os.path.join(hf_dir, file) for name, file in record["files"].items()}
    for path in files.values():
        if not os.path.isfile(path):
            raise ConversionError(f"{hf_dir!r} has no {os.path.basename(path)}, which its "
                                  f"config.json's {record['type']} reads; copy the whole "
                                  "exported directory")
    return TokenizerSpec(record["type"], eod=record.get("eod"), vocab_size=record.get("vocab_size"),
                         legacy=record.get("legacy", False)).with_files(files)


def _write_gpt2(encoder: TextEncoder, out_dir: str, eod_token: str, max_length: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, hf_files.TOKENIZER_FILE)
        encoder.save_json(path)
        hf_files.write_tokenizer(path, out_dir, eod_token, max_length)


def _write_sentencepiece(spec: TokenizerSpec, encoder: TextEncoder, out_dir: str,
                         eod_token: str, max_length: int) -> None:
    try:
        from transformers import LlamaTokenizer
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ConversionError(f"exporting a {spec.tokenizer_type} needs transformers: "
                              "pip install -e '.[hf]'") from err
    special_tokens = getattr(encoder, "special_tokens", {})
    with tempfile.TemporaryDirectory() as tmp:  # only the .model: nothing stale is read
        shutil.copyfile(spec.files()["tokenizer_model"], os.path.join(tmp, SPM_FILE))
        # transformers' legacy=True: every text segment between special tokens starts a word,
        # as Megatron-LM encodes each with SentencePiece's dummy prefix.
        tokenizer = LlamaTokenizer.from_pretrained(
            tmp, add_bos_token=getattr(encoder, "bos", None) is not None, add_eos_token=False,
            legacy=bool(special_tokens), model_max_length=max_length,
            clean_up_tokenization_spaces=False, local_files_only=True)
    _add_special_tokens(tokenizer, special_tokens)
    # Set after the special tokens: a legacy SentencePieceTokenizer's EOD is one of them.
    tokenizer.eos_token = tokenizer.pad_token = eod_token
    tokenizer.init_kwargs["legacy"] = tokenizer.legacy  # else a reload rebuilds legacy=False
    tokenizer.save_pretrained(out_dir)
    shutil.copyfile(spec.files()["tokenizer_model"], os.path.join(out_dir, SPM_FILE))


def _add_special_tokens(tokenizer, special_tokens: dict[str, int]) -> None:
    """A legacy SentencePieceTokenizer's ids past the pieces, as added tokens with the same
    ids."""
    added = sorted((i, t) for t, i in special_tokens.items() if i >= len(tokenizer))
    tokenizer.add_tokens([t for _, t in added], special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids([t for _, t in added])
    if ids != [i for i, _ in added]:
        raise ConversionError(f"the Hugging Face tokenizer gave the special tokens ids {ids}, not "
                              f"Megatron-LM's {[i for i, _ in added]}")
