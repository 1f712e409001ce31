"""A slow, independent GPT-2 BPE encoder (OpenAI's algorithm, as Megatron-LM's gpt2_tokenization.py
runs it) to check the fast GPT2BPETokenizer against.

Python's ``re`` lacks ``\\p{L}``/``\\p{N}``; the pattern below equals GPT-2's on text whose
letters and digits are ASCII or Latin-1, which is what the tests feed it.
"""

from __future__ import annotations

import json
import re

_SPLIT = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


def _byte_symbols() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode symbol table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class ReferenceGPT2:
    def __init__(self, vocab_file: str, merges_file: str) -> None:
        with open(vocab_file, encoding="utf-8") as f:
            self.vocab = json.load(f)
        with open(merges_file, encoding="utf-8") as f:
            pairs = [tuple(line.split()) for line in f.read().splitlines() if line and not line.startswith("#version")]
        self.ranks = {pair: rank for rank, pair in enumerate(pairs)}
        self.symbols = _byte_symbols()

    def _bpe(self, word: tuple[str, ...]) -> tuple[str, ...]:
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in _SPLIT.findall(text):
            word = tuple(self.symbols[b] for b in piece.encode("utf-8"))
            ids.extend(self.vocab[token] for token in self._bpe(word))
        return ids
