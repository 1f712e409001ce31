"""PathMoETokenizer: round trip, EOD, megatron interface, errors on bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from megatron.core.datasets import megatron_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from megatron_pathmoe.data import DataError, EOD_TOKEN, load_tokenizer

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
