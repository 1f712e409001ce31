"""The Hugging Face tokenizer files of an exported model, for each Megatron-LM tokenizer type.

- ``HuggingFaceTokenizer``: the checkpoint's tokenizer.json, as a ``PreTrainedTokenizerFast``.
- ``GPT2BPETokenizer``: vocab.json + merges.txt written as the tokenizer.json that training
  encoded with (byte-level BPE, GPT-2 split pattern), as a ``PreTrainedTokenizerFast``.
- ``SentencePieceTokenizer``/``GPTSentencePieceTokenizer``/``Llama2Tokenizer``: the .model as
  ``tokenizer.model`` plus transformers' ``LlamaTokenizer`` conversion of it (offline), which
  puts BOS before every text for ``Llama2Tokenizer`` only, as Megatron-LM does. The conversion
  turns SentencePiece's piece scores into BPE merges; it can split a run of spaces differently.
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
    LLAMA2_TYPE,
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
        "files": files})
    if spec.tokenizer_type == NULL_TYPE:
        return exported
    eod_token = {i: t for t, i in encoder.vocab().items()}[encoder.eod]
    if spec.tokenizer_type == HF_TYPE:
        hf_files.write_tokenizer(spec.files()["tokenizer_model"], out_dir, eod_token,
                                 model_max_length)
    elif spec.tokenizer_type == GPT2_TYPE:
        _write_gpt2(encoder, out_dir, eod_token, model_max_length)
    else:
        _write_sentencepiece(spec, out_dir, eod_token, model_max_length)
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
    return TokenizerSpec(record["type"], eod=record.get("eod"),
                         vocab_size=record.get("vocab_size")).with_files(files)


def _write_gpt2(encoder: TextEncoder, out_dir: str, eod_token: str, max_length: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, hf_files.TOKENIZER_FILE)
        encoder.save_json(path)
        hf_files.write_tokenizer(path, out_dir, eod_token, max_length)


def _write_sentencepiece(spec: TokenizerSpec, out_dir: str, eod_token: str,
                         max_length: int) -> None:
    try:
        from transformers import LlamaTokenizer
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ConversionError(f"exporting a {spec.tokenizer_type} needs transformers: "
                              "pip install -e '.[hf]'") from err
    with tempfile.TemporaryDirectory() as tmp:  # only the .model: nothing stale is read
        shutil.copyfile(spec.files()["tokenizer_model"], os.path.join(tmp, SPM_FILE))
        tokenizer = LlamaTokenizer.from_pretrained(
            tmp, add_bos_token=spec.tokenizer_type == LLAMA2_TYPE, add_eos_token=False,
            eos_token=eod_token, pad_token=eod_token, model_max_length=max_length,
            clean_up_tokenization_spaces=False, local_files_only=True)
    tokenizer.save_pretrained(out_dir)
    shutil.copyfile(spec.files()["tokenizer_model"], os.path.join(out_dir, SPM_FILE))
