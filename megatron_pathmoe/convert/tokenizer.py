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

In every case the end-of-document token is the model's eos and pad token.
"""

from __future__ import annotations

import os
import shutil
import tempfile

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


def write_hf_tokenizer(spec: TokenizerSpec, out_dir: str,
                       model_max_length: int) -> tuple[int | None, int]:
    """Write the tokenizer files of ``spec`` into ``out_dir`` (none for a NullTokenizer);
    returns (BOS id of a Llama2Tokenizer else None, end-of-document id)."""
    encoder = spec.load()
    bos = getattr(encoder, "bos", None)
    if spec.tokenizer_type == NULL_TYPE:
        return bos, encoder.eod
    eod_token = {i: t for t, i in encoder.vocab().items()}[encoder.eod]
    if spec.tokenizer_type == HF_TYPE:
        hf_files.write_tokenizer(spec.files()["tokenizer_model"], out_dir, eod_token,
                                 model_max_length)
    elif spec.tokenizer_type == GPT2_TYPE:
        _write_gpt2(encoder, out_dir, eod_token, model_max_length)
    else:
        _write_sentencepiece(spec, out_dir, eod_token, model_max_length)
    return bos, encoder.eod


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
