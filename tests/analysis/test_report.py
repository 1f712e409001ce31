"""The recording format, token categories, the report and the plots."""

from __future__ import annotations

import json

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
