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


SPM_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
SPM_TEXTS = ["Good morrow, cousin.", "", "  two  spaces <EOD> and </s> and <s> <CLS>x<unk>"]


def test_sentencepiece_types_match_megatron_core(spm_model, small_docs_text):
    """Megatron-LM core_v0.16.1 preprocesses and trains (without --legacy-tokenizer) with
    megatron-core's tokenizer system: every SentencePiece type is the bare model there, EOD its
    eos. Compared with that code itself."""
    import argparse

    from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer

    texts = SPM_TEXTS + [small_docs_text[0][:500]]
    for name in SPM_TYPES:
        reference = build_tokenizer(argparse.Namespace(
            tokenizer_type=name, tokenizer_model=spm_model, tokenizer_metadata=None,
            tokenizer_sentencepiece_legacy=False, tokenizer_special_tokens=None))
        tok = load_tokenizer(TokenizerSpec(name, spm_model))
        assert (tok.vocab_size, tok.eod) == (reference.vocab_size, reference.eod) == (300, 2)
        assert tok.pad == reference.pad == -1  # GPTDataset's pad
        assert tok.encode_batch(texts) == [reference.tokenize(t) for t in texts]
        for text in texts:
            assert tok.detokenize(tok.tokenize(text)) == reference.detokenize(tok.tokenize(text))


def _spm(tmp_path, name: str, lines: list[str], **options) -> str:
    import sentencepiece as spm

    path = tmp_path / f"{name}.model"
    with open(path, "wb") as out:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out,
                                       vocab_size=120, model_type="bpe", minloglevel=2,
                                       **options)
    return str(path)


def _legacy(path: str):
    return load_tokenizer(TokenizerSpec("SentencePieceTokenizer", path, legacy=True))


def test_legacy_sentencepiece_ids_as_megatron_lm(spm_model):
    """Megatron-LM's legacy _SentencePieceTokenizer (megatron/training/tokenizer/tokenizer.py),
    ids written by hand from reading it: <CLS> <SEP> <EOD> <MASK> take the next ids, then the
    model's pad/bos/eos piece or, where it has none, <PAD>/<BOS>/<EOS>; EOD is <EOD>."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=spm_model)  # 300 pieces: unk 0, bos 1, eos 2
    tok = _legacy(spm_model)
    specials = {"<CLS>": 300, "<SEP>": 301, "<EOD>": 302, "<MASK>": 303, "<PAD>": 304,
                "<s>": 1, "</s>": 2}
    assert (tok.vocab_size, tok.eod, tok.pad, tok.eos) == (305, 302, 304, 2)
    assert {t: tok.vocab[t] for t in specials} == specials
    assert tok.inv_vocab[302] == "<EOD>" and tok.inv_vocab[7] == sp.id_to_piece(7)
    # Special tokens in the text are matched; the text between them is encoded piece by piece
    # (each part with SentencePiece's dummy prefix); <unk> is not one of them.
    enc = sp.encode_as_ids
    text = "Good<EOD> morrow</s>cousin<s><CLS><unk>"
    assert tok.tokenize(text) == (enc("Good") + [302] + enc(" morrow") + [2] + enc("cousin")
                                  + [1, 300] + enc("<unk>"))
    assert tok.tokenize("plain text") == enc("plain text")
    assert tok.encode_batch([text, "plain text", ""]) == [tok.tokenize(text), enc("plain text"), []]
    # detokenize writes " <TOKEN> " between the decoded parts.
    ids = tok.tokenize(text.removesuffix("<unk>"))
    assert tok.detokenize(ids) == "Good <EOD> morrow </s> cousin <s>  <CLS> "
    assert tok.detokenize(np.asarray([302, 302])) == " <EOD>  <EOD> "


def test_legacy_sentencepiece_uses_the_model_pieces_it_has(tmp_path, small_docs_text):
    """A model with a pad piece and no bos/eos: the pad piece keeps its id and is matched in
    text, <BOS>/<EOS> are added; at one position the special token added first wins (here
    <CLS> over the pad piece "<CLS>x"), as Megatron-LM's min() over its dict."""
    import sentencepiece as spm

    lines = [line for text in small_docs_text for line in text.splitlines() if line.strip()]
    path = _spm(tmp_path, "pad", lines, pad_id=3, pad_piece="<CLS>x", bos_id=-1, eos_id=-1)
    sp = spm.SentencePieceProcessor(model_file=path)
    tok = _legacy(path)
    assert {t: tok.vocab[t] for t in ("<CLS>", "<SEP>", "<EOD>", "<MASK>", "<CLS>x", "<BOS>",
                                      "<EOS>")} == {"<CLS>": 120, "<SEP>": 121, "<EOD>": 122,
                                                    "<MASK>": 123, "<CLS>x": 3, "<BOS>": 124,
                                                    "<EOS>": 125}
    assert (tok.vocab_size, tok.eod, tok.pad, tok.eos) == (126, 122, 3, 125)
    assert tok.tokenize("a<CLS>xb<EOS>") == sp.encode_as_ids("a") + [120] + sp.encode_as_ids(
        "xb") + [125]
    assert tok.tokenize("a <CLS>x") == sp.encode_as_ids("a ") + [120] + sp.encode_as_ids("x")
    # Without --legacy-tokenizer a model without eos has no end of document.
    with pytest.raises(DataError, match="no eos piece"):
        load_tokenizer(TokenizerSpec("SentencePieceTokenizer", path))
    default = load_tokenizer(TokenizerSpec("SentencePieceTokenizer", path, eod="<CLS>x"))
    assert (default.eod, default.pad) == (3, 3)


def test_legacy_sentencepiece_on_a_llama_model():
    """The 32,000-piece Llama-family model: <CLS>..<PAD> = 32000..32004, bos/eos stay 1/2."""
    from tests.training.test_tokenizer_types import mistral_model

    tok = _legacy(mistral_model())
    assert [tok.vocab[t] for t in ("<CLS>", "<SEP>", "<EOD>", "<MASK>", "<PAD>", "<s>", "</s>")
            ] == [32000, 32001, 32002, 32003, 32004, 1, 2]
    assert (tok.vocab_size, tok.eod) == (32005, 32002)
    assert tok.tokenize("To be<EOD>or not") == [1791, 347, 32002, 442, 459]


def test_legacy_tokenizer_flag():
    """--legacy-tokenizer is Megatron-LM's flag; it changes only the two types whose legacy
    class differs (elsewhere the spec drops it, so records never differ by it)."""
    import argparse

    from megatron_pathmoe.data.encoders import add_tokenizer_arguments, spec_from_arguments

    parser = argparse.ArgumentParser()
    add_tokenizer_arguments(parser)
    for name, legacy in [("SentencePieceTokenizer", True), ("Llama2Tokenizer", True),
                         ("GPTSentencePieceTokenizer", False), ("HuggingFaceTokenizer", False)]:
        args = parser.parse_args(["--tokenizer-type", name, "--tokenizer-model", "x",
                                  "--legacy-tokenizer"])
        assert spec_from_arguments(args).legacy is legacy
    assert not spec_from_arguments(parser.parse_args(["--tokenizer-model", "x"])).legacy


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


def test_legacy_llama2_puts_bos_before_every_text(spm_model):
    """Megatron-LM's legacy Llama2Tokenizer.tokenize(text): [bos] + sp.encode(text); eod = eos
    (without --legacy-tokenizer there is no BOS: test_sentencepiece_types_match_megatron_core)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=spm_model)
    tok = load_tokenizer(TokenizerSpec("Llama2Tokenizer", spm_model, legacy=True))
    assert (tok.eod, tok.vocab_size, tok.pad) == (sp.eos_id(), sp.get_piece_size(), -1)
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
