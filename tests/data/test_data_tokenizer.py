"""Tokenizers: round trip, EOD, megatron interface, GPT-2 BPE and SentencePiece, errors on bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from megatron.core.datasets import megatron_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from megatron_pathmoe.data import DataError, EOD_TOKEN, TokenizerSpec, load_tokenizer

TEXTS = [
    "If music be the food of love, play on;\nGive me excess of it.",
    "  leading spaces, tabs\tand unicode: café — naïve 你好 🎭\n",
    f"two documents{EOD_TOKEN}joined",
    "",
]


def test_round_trip_and_interface(tokenizer, tokenizer_path):
    assert isinstance(tokenizer, megatron_tokenizer.MegatronLegacyTokenizer)
    assert tokenizer.path == tokenizer_path
    assert tokenizer.vocab_size == 4096
    assert tokenizer.eod == tokenizer.vocab[EOD_TOKEN] == 0
    assert tokenizer.inv_vocab[tokenizer.eod] == EOD_TOKEN
    for text in TEXTS:
        ids = tokenizer.tokenize(text)
        assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.detokenize(ids) == text
        assert tokenizer.detokenize(np.asarray(ids, dtype=np.uint16)) == text
    assert tokenizer.encode_batch(TEXTS) == [tokenizer.tokenize(t) for t in TEXTS]
    # The special token is matched as one id, never split into bytes.
    assert tokenizer.tokenize(TEXTS[2]).count(tokenizer.eod) == 1
    # BPE actually compresses English text.
    assert len(tokenizer.tokenize(TEXTS[0])) < len(TEXTS[0]) / 2.5


def _assert_names_flag(err: pytest.ExceptionInfo, path: str) -> None:
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    assert path in message and "--tokenizer-model" in message and "\n" not in message


def test_missing_tokenizer_file(tmp_path):
    path = str(tmp_path / "nope.json")
    with pytest.raises(DataError) as err:
        load_tokenizer(path)
    _assert_names_flag(err, path)
    assert "no such file" in str(err.value)


@pytest.mark.parametrize("content", ["not json at all", json.dumps({"model": {"type": "BPE"}})])
def test_invalid_tokenizer_file(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_tokenizer(path)
    _assert_names_flag(err, str(path))


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(DataError) as err:
        load_tokenizer(tmp_path)
    _assert_names_flag(err, str(tmp_path))


def test_tokenizer_without_eod(tmp_path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world"] * 10, trainer=trainer)
    path = str(tmp_path / "no_eod.json")
    tok.save(path)
    with pytest.raises(DataError, match="end-of-document") as err:
        load_tokenizer(path)
    _assert_names_flag(err, path)
    # An explicit EOD (token or id) is accepted.
    some_token, some_id = next(iter(tok.get_vocab().items()))
    assert load_tokenizer(path, eod=some_token).eod == some_id
    assert load_tokenizer(path, eod=5).eod == 5
    with pytest.raises(DataError):
        load_tokenizer(path, eod=10**6)


# --- the other Megatron-LM tokenizer types ---------------------------------------------------

GPT2_TEXTS = [
    "If music be the food of love, play on;\nGive me excess of it, that, surfeiting,",
    "  two  spaces, tabs\tand  trailing   \n\n\nnewlines; it's we'll they've I'm you'd",
    "numbers 12345 and 3.14, snake_case_names, URLs http://x.y/z?q=1&r=2 -- café naïve",
    "special tokens are plain text here: <|endoftext|> stays bytes",
]


def test_gpt2_bpe_matches_reference_algorithm(gpt2_files, small_docs_text):
    from tests.data.gpt2_reference import ReferenceGPT2

    vocab, merges = gpt2_files
    tok = load_tokenizer(TokenizerSpec("GPT2BPETokenizer", vocab_file=vocab, merge_file=merges))
    reference = ReferenceGPT2(vocab, merges)
    assert tok.eod == reference.vocab["<|endoftext|>"] and tok.vocab_size == len(reference.vocab)
    for text in GPT2_TEXTS + small_docs_text[:3]:
        ids = tok.tokenize(text)
        assert ids == reference.encode(text), text[:60]
        assert tok.detokenize(ids) == text
    # Like Megatron's GPT-2 BPE, EOD written in the text is not matched as a special token.
    assert tok.eod not in tok.tokenize(GPT2_TEXTS[3])


def test_sentencepiece_uses_eos_as_eod(spm_model, small_docs_text):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=spm_model)
    for name in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        tok = load_tokenizer(TokenizerSpec(name, spm_model))
        assert tok.eod == sp.eos_id() == 2 and tok.vocab_size == 300
    text = small_docs_text[0][:500]
    assert tok.tokenize(text) == sp.encode_as_ids(text)
    assert tok.encode_batch([text, "Good morrow."]) == [sp.encode_as_ids(text), sp.encode_as_ids("Good morrow.")]
    assert tok.detokenize(tok.tokenize("Good morrow, cousin.")) == "Good morrow, cousin."


@pytest.mark.parametrize("spec, flag", [
    (TokenizerSpec("BertWordPieceLowerCase", "x"), "--tokenizer-type"),
    (TokenizerSpec("GPT2BPETokenizer", vocab_file=None, merge_file="m.txt"), "--vocab-file"),
    (TokenizerSpec("GPT2BPETokenizer", vocab_file="missing-vocab.json", merge_file="m.txt"), "--vocab-file"),
    (TokenizerSpec("SentencePieceTokenizer", "missing.model"), "--tokenizer-model"),
    (TokenizerSpec("HuggingFaceTokenizer", None), "--tokenizer-model"),
])
def test_tokenizer_flags_errors_name_the_flag(spec, flag):
    with pytest.raises(DataError) as err:
        spec.load()
    assert flag in str(err.value) and "\n" not in str(err.value)


def test_corrupt_gpt2_and_sentencepiece_files(tmp_path, gpt2_files):
    junk = tmp_path / "junk"
    junk.write_text("not a model")
    with pytest.raises(DataError, match="SentencePiece"):
        TokenizerSpec("SentencePieceTokenizer", str(junk)).load()
    with pytest.raises(DataError, match="vocab.json"):
        TokenizerSpec("GPT2BPETokenizer", vocab_file=str(junk), merge_file=gpt2_files[1]).load()


def test_llama2_puts_bos_before_every_text(spm_model):
    """Megatron-LM's Llama2Tokenizer.tokenize(text): [bos] + sp.encode(text); eod = eos."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=spm_model)
    tok = load_tokenizer(TokenizerSpec("Llama2Tokenizer", spm_model))
    assert (tok.eod, tok.vocab_size) == (sp.eos_id(), sp.get_piece_size())
    texts = ["Good morrow, cousin.", "", "Is it so early?"]
    assert tok.encode_batch(texts) == [[sp.bos_id()] + sp.encode(t) for t in texts]
    assert tok.detokenize(tok.tokenize(texts[0])) == texts[0]


def test_null_tokenizer_reads_ids_as_megatron_lm():
    """Megatron-LM's NullTokenizer: text is space-separated ids, eod = N, vocabulary N + 1."""
    tok = load_tokenizer(TokenizerSpec("NullTokenizer", vocab_size=100))
    assert (tok.eod, tok.vocab_size) == (100, 101)
    assert tok.tokenize("3 1 4 1 5") == [3, 1, 4, 1, 5]
    assert tok.tokenize("7 100") == [7, 100]
    assert tok.detokenize(np.asarray([3, 1, 4])) == "3 1 4"
    for text, match in [("3 x", "separated by single spaces"), ("3  4", "separated by single"),
                        ("101", "outside the NullTokenizer's vocabulary"), ("-1", "outside")]:
        with pytest.raises(DataError, match=match):
            tok.tokenize(text)
    for spec, match in [(TokenizerSpec("NullTokenizer"), "needs --vocab-size"),
                        (TokenizerSpec("NullTokenizer", eod=5, vocab_size=100), "drop --eod-token")]:
        with pytest.raises(DataError, match=match):
            spec.load()
