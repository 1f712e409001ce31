"""The medium study (benchmarks/paper_medium.py) end to end at toy size: a toy corpus built by
the corpus builder (same bytes twice), runs evaluated at two checkpoints, the report's table
equal to the runs' files, a rerun that trains nothing, a byte-identical --report-only, the
expert drift and the re-measured robustness; plus the verdict rule by hand."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics

import pytest

from megatron_pathmoe.data import DataError
from megatron_pathmoe.study.corpus import DocSource, build_corpus, corpus_paths, is_held_out
from megatron_pathmoe.study.report import METRICS
from megatron_pathmoe.study.robustness_recheck import DRAWS, RECHECK_FILE
from megatron_pathmoe.study.runner import TRACKER_FILE, StudyConfig, train_command
from megatron_pathmoe.study.trajectory import judge, paired, trend
from megatron_pathmoe.study.variants import VARIANTS
from tests.conftest import REPO, run_cli

TOY = ["train_iters=4", "checkpoint_iterations=2,4", "num_layers=4", "hidden_size=32",
       "num_attention_heads=2", "num_query_groups=1", "moe_ffn_hidden_size=32", "num_experts=4",
       "moe_router_topk=2", "seq_length=64", "micro_batch_size=4", "global_batch_size=4",
       "lambada_limit=4", "analysis_tokens=512", "robustness_tokens=128", "log_interval=2"]
WORDS = ("kernel module driver memory python class function return value list page lock "
         "thread process signal buffer").split()


def _toy_source(root) -> DocSource:
    for i in range(40):
        words = [WORDS[(i * 7 + j * j) % len(WORDS)] for j in range(600)]
        path = root / f"part{i % 3}" / f"doc{i:02d}.rst.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"Title {i}\n========\n\n" + " ".join(words) + "\n")
    return DocSource("toy-docs", "toy-doc-package", str(root))


def _build(source: DocSource, out) -> dict:
    return build_corpus(str(out), sources=(source,), vocab_size=320, per_mille=250,
                        shakespeare=False)


def _args(tmp_path, *extra: str) -> list[str]:
    return ["--output-dir", str(tmp_path / "scratch"), "--results-dir", str(tmp_path / "results"),
            "--corpus-dir", str(tmp_path / "corpus"), "--variants", "indep_aux", "path4",
            "--seeds", "1", *extra, "--set", *TOY]


def _in_process(tmp_path, capsys, *extra: str) -> tuple[int, str]:
    """paper_medium.main in this process (its stages are subprocesses either way)."""
    spec = importlib.util.spec_from_file_location("paper_medium", os.path.join(
        REPO, "benchmarks", "paper_medium.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    code = module.main(_args(tmp_path, *extra))
    return code, capsys.readouterr().out


def _json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def test_toy_study_end_to_end(tmp_path, capsys):
    source = _toy_source(tmp_path / "docs")
    manifest = _build(source, tmp_path / "corpus")
    again = _build(source, tmp_path / "corpus_again")
    assert again["sha256"] == manifest["sha256"]  # same bytes on a rebuild
    held = {p.name for p in (tmp_path / "docs").rglob("*.rst.txt")
            if is_held_out(p.relative_to(tmp_path / "docs").as_posix(), 250)}
    assert manifest["valid"]["toy-docs"]["documents"] == len(held) > 0
    assert os.path.exists(corpus_paths(str(tmp_path / "corpus"))["valid_prefix"] + ".bin")

    result = run_cli([os.path.join("benchmarks", "paper_medium.py"), *_args(tmp_path)],
                     timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "results"
    table = _json(out / "results.json")["table"]
    for variant in ("indep_aux", "path4"):
        run = out / "runs" / f"{variant}_seed1"
        assert not (run / "checkpoints").exists()  # results only: no checkpoints
        for it in (2, 4):
            ppl = _json(run / f"iter_{it:07d}" / "eval.json")["validation"]["perplexity"]
            assert table["valid_ppl"][variant][str(it)]["mean"] == pytest.approx(ppl)
            analysis = _json(run / f"iter_{it:07d}" / "analysis" / "report.json")["models"][variant]
            assert table["load_cv"][variant][str(it)]["mean"] == \
                pytest.approx(analysis["expert_load"]["mean_cv"])
            on_top = sum(p["tokens"] for p in analysis["top_paths"])
            assert table["top_path_coverage"][variant][str(it)]["mean"] == \
                pytest.approx(100 * on_top / analysis["tokens"])
    # The two checkpoints are different models.
    assert table["valid_ppl"]["path4"]["2"]["mean"] != table["valid_ppl"]["path4"]["4"]["mean"]
    markdown = (out / "results.md").read_text()
    assert "Runs committed: 2 of 2" in markdown
    assert "| PathB4-MoE − Indep-MoE (LBL 0.01) |" in markdown
    # A metric without a paper claim shows no "[seeds in the paper's direction]" count.
    coverage = markdown.split("most frequent paths (%) (no paper claim)")[1].split("###")[0]
    assert "PathB4-MoE − Indep-MoE (LBL 0.01) |" in coverage and "/1]" not in coverage
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert before["trajectory_differences.png"][:4] == b"\x89PNG"

    # A rerun trains nothing, also with the scratch folder gone (a fresh machine); the report
    # rebuilds byte for byte from the results alone.
    os.rename(tmp_path / "scratch", tmp_path / "scratch_gone")
    code, stdout = _in_process(tmp_path, capsys)
    assert code == 0 and "every run is complete" in stdout
    assert not (tmp_path / "scratch" / "runs").exists()
    assert _in_process(tmp_path, capsys, "--report-only")[0] == 0
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    # A missing run is reported as missing, not as an error.
    code, stdout = _in_process(tmp_path, capsys, "--report-only", "--seeds", "1", "2")
    assert code == 0 and "Runs committed: 2 of 4" in stdout and "indep_aux seed 2" in stdout

    # Robustness read against load balance: one point per run and checkpoint.
    assert "## Robustness and load balance" in markdown and "(4 points)" in markdown
    assert "`expert_drift.json` absent" in markdown
    # Without the checkpoints there is nothing to re-measure robustness on: said, not an error.
    code, stdout = _in_process(tmp_path, capsys, "--report-only", "--robustness-recheck")
    assert code == 0 and "no checkpoint at step 4" in stdout and "path4 seed 1" in stdout
    assert "## Robustness re-measured" not in stdout
    # --expert-drift (checkpoints back in place) adds the idle experts' drift to the report.
    os.rename(tmp_path / "scratch_gone", tmp_path / "scratch")
    code, stdout = _in_process(tmp_path, capsys, "--report-only", "--expert-drift")
    assert code == 0 and "Are idle experts untrained?" in stdout
    drift = _json(out / "expert_drift.json")
    assert sorted(drift["runs"]) == ["indep_aux_seed1", "path4_seed1"]
    for run in drift["runs"].values():
        assert sorted(run["checkpoints"]) == ["2", "4"]
        summary = run["checkpoints"]["4"]["summary"]
        assert summary["experts"] == 16 and summary["cosine_max"] < 1.0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert _in_process(tmp_path, capsys, "--report-only")[0] == 0
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    # --robustness-recheck: p=1 at the last checkpoint with more draws on more tokens, published
    # beside the run's analysis and shown in the report; a second call re-measures nothing.
    code, stdout = _in_process(tmp_path, capsys, "--report-only", "--robustness-recheck",
                               "--jobs", "1")
    assert code == 0 and "## Robustness re-measured" in stdout
    table = _json(out / "results.json")["table"]
    for variant in ("indep_aux", "path4"):
        folder = out / "runs" / f"{variant}_seed1" / "iter_0000004"
        record = _json(folder / RECHECK_FILE)
        original = _json(folder / "analysis" / "report.json")["models"][variant]["robustness"]
        assert record["draws"] == DRAWS and record["iteration"] == 4
        assert record["tokens"] > original["tokens"] == 128
        draws, base = record["draw_perplexities"], record["base_perplexity"]
        assert len(draws) == DRAWS and record["perplexity"] == pytest.approx(sum(draws) / DRAWS)
        assert record["degradation_percent"] == pytest.approx(100 * (sum(draws) / DRAWS / base - 1))
        assert table["robust_p1_recheck"][variant]["4"]["mean"] == \
            pytest.approx(100 * (statistics.median(draws) / base - 1))
        assert table["robust_p1_recheck_mean"][variant]["4"]["mean"] == \
            pytest.approx(record["degradation_percent"])
        assert table["robust_p1_recheck"][variant]["2"]["n"] == 0  # the last checkpoint only
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, stdout = _in_process(tmp_path, capsys, "--report-only", "--robustness-recheck")
    assert code == 0 and "robustness recheck " not in stdout
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_missing_source_names_the_apt_package(tmp_path):
    absent = DocSource("python-docs", "python3.11-doc", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="apt-get install -y --no-install-recommends "
                                        "python3.11-doc"):
        build_corpus(str(tmp_path / "out"), sources=(absent,), shakespeare=False)


def test_verdict_rule_by_hand():
    ppl = next(m for m in METRICS if m.key == "valid_ppl")  # paper: PathB4 lower
    values = {"valid_ppl": {"path4": {1: {1: 98.0, 2: 99.0, 3: 97.0},
                                      2: {1: 100.0, 2: 112.0, 3: 95.0}},
                            "indep_aux": {1: {1: 100.0, 2: 101.0, 3: 100.0},
                                          2: {1: 101.0, 2: 101.0, 3: 101.0}}}}
    first, last = (paired(values, ppl, "path4", "indep_aux", it) for it in (1, 2))
    assert first["by_seed"] == {1: -2.0, 2: -2.0, 3: -3.0} and first["in_paper_direction"] == 3
    assert first["std"] == pytest.approx(statistics.stdev([-2.0, -2.0, -3.0]))
    assert judge(ppl, first) == "holds"  # every seed lower, mean 4 standard errors from 0
    assert judge(ppl, last) == "inside the noise"  # seeds disagree
    flipped = {**first, "mean": -first["mean"], "in_paper_direction": 0}
    assert judge(ppl, flipped) == "reverses"
    assert judge(ppl, {**first, "n": 1}) == "not enough seeds"
    wider = {**first, "mean": -10.0}
    assert trend(first, wider) == "gap grows" and trend(wider, first) == "gap shrinks"
    assert trend(first, first) == "gap about constant"
    relative = paired(values, ppl, "path4", "indep_aux", 1, relative=True)  # 100 (a / b − 1)
    assert relative["by_seed"] == pytest.approx({1: -2.0, 2: -100 * 2 / 101, 3: -3.0})
    assert relative["in_paper_direction"] == 3


def test_unfinished_training_resumes_from_its_newest_checkpoint(tmp_path):
    cfg = StudyConfig(str(tmp_path), "train", "valid", "tok.json", train_iters=1500,
                      checkpoint_iterations=(250, 500, 1000, 1500))
    ckpt = tmp_path / "runs" / "path4_seed1" / "checkpoints"

    def flag(command: list[str], name: str) -> str | None:
        return command[command.index(name) + 1] if name in command else None

    command = train_command(cfg, VARIANTS["path4"], 1)
    assert flag(command, "--save-interval") == "250" and flag(command, "--load") is None
    ckpt.mkdir(parents=True)
    (ckpt / TRACKER_FILE).write_text("500\n")
    assert flag(train_command(cfg, VARIANTS["path4"], 1), "--load") == str(ckpt)
    (ckpt / TRACKER_FILE).write_text("1500\n")  # training finished: nothing to resume
    assert flag(train_command(cfg, VARIANTS["path4"], 1), "--load") is None
