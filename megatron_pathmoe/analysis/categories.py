"""Token categories of the paper's Table 9 (Appendix C.4) and path specialisation (section 5.3).

Each vocabulary entry is classified once from its text (leading/trailing whitespace removed; a
word piece is classified as if it were a word). The first rule that matches wins, in this
order: ``whitespace``, ``punctuation`` (no letter or digit), ``ordinals`` (1st, 22nd),
``numbers`` (digits with , . separators), the lexical lists in the order of Table 9 (person
names and nationalities match capitalised words exactly, the other lists match the lowercased
word), then the patterns ``adverbs_other`` (-ly), ``verbs`` (-ing/-ed), ``abstract_nouns``
(-tion/-sion/-ness/-ment), ``agent_nouns`` (-er/-or), then ``proper_nouns`` (capitalised words
left), ``other_words`` (any other alphabetic word) and ``other``. The lists hold Table 9's
examples plus common members of each class, with the early-modern pronouns of the demo corpus
(thou, thee, thy).

**Cluster concentration** of the most frequent paths: ``1 - H(C | P) / H(C)`` over the tokens
on those paths, where C is the token's category and P its path, i.e. the fraction of the
category entropy that knowing the path removes (normalised mutual information; 0: paths carry
no information about categories, 1: every path holds a single category). **Purity** of a path
is the share of its most common category.
"""

from __future__ import annotations

import re

import numpy as np

from megatron_pathmoe.analysis.counting import pair_histogram

LEXICAL: dict[str, frozenset[str]] = {name: frozenset(words.split()) for name, words in {
    "person_names": "Andrea Richard Oprah Mary John Elizabeth James Robert Michael William "
                    "David Thomas Charles Joseph Henry George Edward Peter Paul Mark Anne Jane "
                    "Sarah Susan Margaret Emma Alice Catherine Kate Anna Maria Helen Laura Julia "
                    "Lucy Hamlet Romeo Juliet Othello Macbeth Falstaff Portia Rosalind Viola "
                    "Antonio Sebastian Brutus Caesar Cassius Lear Cordelia Prospero Ophelia",
    "titles_roles": "secretary minister commander winner professor ceo president king queen "
                    "prince princess duke duchess lord lady sir madam captain general doctor "
                    "director chairman senator governor judge officer soldier emperor earl "
                    "count countess knight bishop priest master mistress servant",
    "speech_verbs": "said explained told asked claimed announced says say tell tells asks "
                    "replied answered added stated noted declared insisted argued suggested "
                    "reported cried spoke speak speaks whispered shouted",
    "adverbs_discourse": "especially actually particularly however therefore moreover "
                         "furthermore indeed nevertheless thus hence meanwhile instead "
                         "otherwise besides anyway certainly perhaps",
    "adverbs_manner": "quickly carefully successfully directly properly slowly easily well "
                      "badly clearly simply quietly gently loudly hardly fast",
    "adverbs_time": "now today recently always sometimes currently then soon never often "
                    "already yet still tomorrow yesterday tonight later ever again once",
    "nationalities": "American British Chinese European Japanese English French German "
                     "Italian Spanish Russian Indian Canadian Australian African Asian Roman "
                     "Greek Irish Scottish Welsh Danish Dutch",
    "temporal_words": "monday tuesday wednesday thursday friday saturday sunday january "
                      "february march april may june july august september october november "
                      "december morning afternoon evening night year years summer winter "
                      "spring autumn day days week weeks month months hour hours minute time",
    "prepositions": "in on at to for with by from about of into onto upon over under between "
                    "through during before after above below against among within without "
                    "toward towards across behind beyond near",
    "conjunctions": "and or but because although while if nor so unless though whether since "
                    "until whereas",
    "determiners": "the a an this that these those some every each any no another either "
                   "neither",
    "pronouns": "he she they it who someone anybody i me my mine you your yours him his her "
                "hers we us our ours them their theirs its myself yourself himself herself "
                "itself ourselves themselves whom whose which what anyone everyone nobody "
                "somebody something anything nothing everything thou thee thy thine ye",
    "quantifiers": "all many most million percent several few much more less least both half "
                   "billion thousand hundred dozen enough",
    "common_verbs": "is have go make take know get are was were be been being am has had do "
                    "does did come came see saw give gave think thought want find found let "
                    "put seem shall will would should can could must might hath doth art",
    "adjectives": "good new important political economic public great old high little small "
                  "large big long young other same different first last own right bad true "
                  "false sweet fair noble poor",
}.items()}
CASE_SENSITIVE = frozenset({"person_names", "nationalities"})
PATTERNS: list[tuple[str, re.Pattern]] = [
    ("adverbs_other", re.compile(r"^[a-z]{2,}ly$")),
    ("verbs", re.compile(r"^[a-z]{2,}(ing|ed)$")),
    ("abstract_nouns", re.compile(r"^[a-z]{2,}(tion|sion|ness|ment)$")),
    ("agent_nouns", re.compile(r"^[a-z]{2,}(er|or)$")),
]
CATEGORIES: tuple[str, ...] = ("whitespace", "punctuation", "ordinals", "numbers", *LEXICAL,
                               *(name for name, _ in PATTERNS), "proper_nouns", "other_words",
                               "other")
_ORDINAL = re.compile(r"^\d+(st|nd|rd|th)$", re.IGNORECASE)
_NUMBER = re.compile(r"^\d[\d,.]*$")


def categorize(text: str) -> str:
    """The category of one token's text (rules in the module docstring)."""
    word = text.strip()
    if not word:
        return "whitespace"
    if not any(ch.isalnum() for ch in word):
        return "punctuation"
    if _ORDINAL.match(word):
        return "ordinals"
    if _NUMBER.match(word):
        return "numbers"
    lower = word.lower()
    for name, words in LEXICAL.items():
        if (word if name in CASE_SENSITIVE else lower) in words:
            return name
    for name, pattern in PATTERNS:
        if pattern.match(lower):
            return name
    if word.isalpha():
        return "proper_nouns" if word[0].isupper() else "other_words"
    return "other"


def vocabulary_categories(token_texts: list[str]) -> np.ndarray:
    """uint8 [vocab]: index into :data:`CATEGORIES` of each token id's text."""
    index = {name: i for i, name in enumerate(CATEGORIES)}
    return np.array([index[categorize(t)] for t in token_texts], np.uint8)


def category_by_path(path_rank: np.ndarray, token_category: np.ndarray,
                     num_paths: int) -> np.ndarray:
    """int64 [num_paths, len(CATEGORIES)]: tokens of each category on each of the most
    frequent paths (``path_rank`` from ``PathDistribution.rank_of``; -1 = other paths)."""
    on_top = path_rank >= 0
    size = max(num_paths, len(CATEGORIES))
    table = pair_histogram(path_rank[on_top].astype(np.int64), token_category[on_top], size)
    return table[:num_paths, :len(CATEGORIES)]


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def cluster_concentration(table: np.ndarray) -> dict:
    """Concentration and purity (module docstring) of a ``category_by_path`` table."""
    total = table.sum()
    if total == 0:
        return {"concentration": None, "mean_purity": None, "purity": []}
    path_sizes = table.sum(1)
    h_c = _entropy(table.sum(0))
    h_c_given_p = sum(size / total * _entropy(row) for size, row in zip(path_sizes, table)
                      if size)
    purity = np.where(path_sizes > 0, table.max(1) / np.maximum(path_sizes, 1), 0.0)
    return {"concentration": 1.0 - h_c_given_p / h_c if h_c > 0 else 1.0,
            "mean_purity": float((purity * path_sizes).sum() / total),
            "purity": purity.tolist()}
