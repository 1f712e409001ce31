"""The recording format, token categories, the report and the plots."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from megatron_pathmoe.analysis.categories import (
    CATEGORIES,
    categorize,
    category_by_path,
    cluster_concentration,
)
from megatron_pathmoe.analysis.path_arrays import (
    META_FILE,
    ExpertPaths,
    PathFormatError,
    PathWriter,
    load_paths,
    save_paths,
)
from megatron_pathmoe.analysis.report import path_report
from megatron_pathmoe.analysis.synthetic import synthetic_paths


def test_two_writers_fill_one_recording(tmp_path):
    rng = np.random.default_rng(0)
    experts = rng.integers(0, 8, (3, 2, 10), dtype=np.uint8)
    probs = rng.random((3, 2, 10)).astype(np.float16)
    tokens = rng.integers(0, 100, 10).astype(np.int32)
    first = PathWriter.create(str(tmp_path), 10, [1, 2, 3], 8, 2)
    second = PathWriter.open(str(tmp_path))  # another process, writing the other half
    for writer, part in ((first, slice(0, 6)), (second, slice(6, 10))):
        for i, layer in enumerate((1, 2, 3)):
            writer.write_layer(layer, part.start, experts[i, :, part], probs[i, :, part])
        writer.write_tokens(part.start, tokens[part], np.arange(10)[part])
        writer.flush()
    with pytest.raises(PathFormatError, match="incomplete"):
        load_paths(str(tmp_path))
    first.finalize({"label": "x"})
    paths = load_paths(str(tmp_path))
    assert (paths.experts == experts).all() and (paths.probs == probs).all()
    assert (paths.tokens == tokens).all() and paths.positions.tolist() == list(range(10))
    assert paths.layer_numbers == (1, 2, 3) and paths.info == {"label": "x"}
    with pytest.raises(ValueError, match="layer 7"):
        first.write_layer(7, 0, experts[0], probs[0])


def test_not_a_recording_names_the_directory(tmp_path):
    with pytest.raises(PathFormatError, match=str(tmp_path)):
        load_paths(str(tmp_path))
    (tmp_path / META_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(PathFormatError, match="not a pathmoe-expert-paths"):
        load_paths(str(tmp_path))


@pytest.mark.parametrize("text, category", [
    ("Richard", "person_names"), (" said", "speech_verbs"), (" the", "determiners"),
    ("quickly", "adverbs_manner"), (" happily", "adverbs_other"), ("running", "verbs"),
    ("created", "verbs"), ("creation", "abstract_nouns"), ("kindness", "abstract_nouns"),
    ("player", "agent_nouns"), ("actor", "agent_nouns"), ("2024", "numbers"), ("1,000", "numbers"),
    ("1st", "ordinals"), ("22nd", "ordinals"), (" London", "proper_nouns"), (",", "punctuation"),
    ("?!", "punctuation"), (" \n", "whitespace"), (" thou", "pronouns"),
    ("Monday", "temporal_words"), ("American", "nationalities"), ("american", "other_words"),
    ("however", "adverbs_discourse"), ("now", "adverbs_time"), (" with", "prepositions"),
    ("because", "conjunctions"), ("million", "quantifiers"), ("is", "common_verbs"),
    ("good", "adjectives"), ("king", "titles_roles"), ("tree", "other_words"), ("x2", "other"),
])
def test_table9_categories(text, category):
    assert categorize(text) == category


def test_cluster_concentration_extremes():
    pure = np.array([[10, 0, 0], [0, 5, 0], [0, 0, 7]])
    result = cluster_concentration(pure)
    assert result["concentration"] == pytest.approx(1.0) and result["mean_purity"] == 1.0
    mixed = np.array([[10, 10, 20], [5, 5, 10]])  # every path has the overall mix
    result = cluster_concentration(mixed)
    assert result["concentration"] == pytest.approx(0.0, abs=1e-12)
    assert result["purity"] == [0.5, 0.5]
    ranks = np.array([0, 0, 1, -1, 1])
    categories = np.array([2, 2, 3, 0, 3], np.uint8)
    table = category_by_path(ranks, categories, 2)
    assert table.shape == (2, len(CATEGORIES)) and table[0, 2] == 2 and table[1, 3] == 2
    assert table.sum() == 4  # the token off the top paths is left out


def test_report_of_a_saved_synthetic_recording(tmp_path):
    paths = synthetic_paths(20_000, num_layers=8, num_experts=8, topk=2, stay=0.2,
                            stay_in_block=0.95, block_size=4, seed=3)
    save_paths(str(tmp_path / "rec"), paths)
    loaded = load_paths(str(tmp_path / "rec"))
    texts = [" the" if i % 2 else "," for i in range(4096)]
    report = path_report(loaded, texts, top_paths=10)
    json.dumps(report)  # JSON-ready
    assert report["tokens"] == 20_000 and report["layers"] == 8
    # Block structure: pairs inside a block keep ~95% of decisions, the boundary ~20%.
    agreement = report["correlation"]["agreement"]
    assert min(agreement[i] for i in (0, 1, 2, 4, 5, 6)) > 0.9 and agreement[3] < 0.5
    assert report["path_entropy"]["entropy_bits"] <= report["path_entropy"]["max_entropy_bits"]
    assert report["coverage"]["fraction"][-1] == pytest.approx(1.0)
    assert len(report["top_paths"]) == 10 and report["top_paths"][0]["rank"] == 0
    assert sum(report["engagement"]["run_length_fraction"]) == pytest.approx(1.0)
    assert report["usage_entropy_bits"][0] == pytest.approx(1.0)  # k=2 distinct experts
    assert np.asarray(report["expert_load"]["load"]).sum(1) == pytest.approx(np.ones(8))
    assert sum(map(sum, report["categories"]["by_path"])) == \
        sum(row["tokens"] for row in report["top_paths"])
    top = report["top_paths"][0]
    on_top = (loaded.top1.T == np.array(top["experts"], np.uint8)).all(1).sum()
    assert on_top == top["tokens"]


def test_expert_paths_checks_shapes():
    with pytest.raises(ValueError, match="layer numbers"):
        ExpertPaths(np.zeros((2, 1, 3), np.uint8), None, np.zeros(3, np.int32),
                    np.zeros(3, np.int32), 4, (1,))
    with pytest.raises(ValueError, match="tokens/positions"):
        ExpertPaths(np.zeros((1, 1, 3), np.uint8), None, np.zeros(2, np.int32),
                    np.zeros(3, np.int32), 4, (1,))


def test_token_stream_from_text_jsonl_and_indexed_data(demo_data, tmp_path):
    from megatron_pathmoe.analysis.forward import TokenWindows, read_token_stream
    from megatron_pathmoe.data import load_tokenizer, token_stream

    tokenizer = load_tokenizer(demo_data["tokenizer"])
    text = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind\n"
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "To be"}) + "\n\n"
                                      + json.dumps({"text": "or not"}) + "\n")
    assert read_token_stream(str(tmp_path / "a.txt"), 1000, tokenizer).tolist() == \
        tokenizer.tokenize(text)
    assert read_token_stream(str(tmp_path / "a.jsonl"), 1000, tokenizer).tolist() == \
        tokenizer.tokenize("To be") + [tokenizer.eod] + tokenizer.tokenize("or not") + \
        [tokenizer.eod]
    indexed = read_token_stream(demo_data["valid_prefix"], 300, tokenizer)
    assert indexed.tolist() == token_stream(demo_data["valid_prefix"])[:300].tolist()
    windows = TokenWindows.from_stream(indexed, 64, "x")  # 300 tokens: 4 sequences + 1 label
    assert windows.num_samples == 4 and windows.num_tokens == 256
    batch = windows.batch(None, 2)  # padding: no loss
    assert batch["loss_mask"].sum() == 0 and batch["tokens"].shape == (2, 64)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        TokenWindows.from_stream(indexed[:64], 64, "x")
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a JSON object"):
        read_token_stream(str(tmp_path / "bad.jsonl"), 10, tokenizer)
    small = SimpleNamespace(vocab_size=10, eod=0)  # a checkpoint with a smaller vocabulary
    with pytest.raises(ValueError, match="outside the checkpoint's vocabulary"):
        read_token_stream(demo_data["valid_prefix"], 100, small)
