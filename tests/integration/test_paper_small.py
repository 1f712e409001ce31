"""The small-scale reproduction (benchmarks/paper_small.py) and the GPU throughput script
(benchmarks/paper_gpu.py) as users run them, at toy sizes: the table holds what the runs
measured, reruns resume, failures name the log; plus the seed-paired statistics by hand."""

from __future__ import annotations

import json
import math
import os
import statistics

import numpy as np
import pytest

from megatron_pathmoe.study.report import METRICS, claim_checks, mean_std, paired_difference
from megatron_pathmoe.study.variants import VARIANTS, select_variants
from tests.conftest import run_cli

TOY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2",
       "--num-query-groups", "1", "--moe-ffn-hidden-size", "32", "--num-experts", "4",
       "--moe-router-topk", "2", "--seq-length", "64", "--micro-batch-size", "4",
       "--global-batch-size", "4", "--train-iters", "6", "--lambada-limit", "8",
       "--analysis-tokens", "1024", "--robustness-tokens", "256"]


def _study(demo_data, out, *extra: str):
    return run_cli([os.path.join("benchmarks", "paper_small.py"), "--output-dir", str(out),
                    "--data-path", demo_data["train_prefix"],
                    "--valid-data-path", demo_data["valid_prefix"], *TOY, *extra], timeout=900)


def _json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def test_study_table_holds_what_the_runs_measured_and_reruns_resume(demo_data, tmp_path):
    out = tmp_path / "study"
    result = _study(demo_data, out, "--variants", "path2", "--seeds", "1", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "12 stages to run over 4 runs" in result.stdout
    runs = {(v, s): {"eval": _json(out / "runs" / f"{v}_seed{s}" / "eval.json"),
                     "summary": _json(out / "runs" / f"{v}_seed{s}" / "summary.json")}
            for v in ("indep_aux", "path2") for s in (1, 2)}
    summary = _json(out / "results.json")["summary"]
    # Mean and sample std of the held-out perplexity are those of the runs' eval.json.
    for v in ("indep_aux", "path2"):
        ppl = [runs[v, s]["eval"]["validation"]["perplexity"] for s in (1, 2)]
        assert summary[v]["valid_ppl"]["mean"] == pytest.approx(statistics.fmean(ppl))
        assert summary[v]["valid_ppl"]["std"] == pytest.approx(statistics.stdev(ppl))
        assert all(math.isfinite(p) and p > 1 for p in ppl)
    # Both layers share one router in PathB2 at L=2: half the router parameters.
    assert runs["path2", 1]["summary"]["parameters"]["router"] * 2 == \
        runs["indep_aux", 1]["summary"]["parameters"]["router"]
    assert summary["indep_aux"]["speed_ratio"]["mean"] == pytest.approx(1.0)
    markdown = (out / "results.md").read_text()
    assert "| PathB2-MoE |" in markdown and "| Indep-MoE (LBL 0.01) |" in markdown
    assert " ± " in markdown and "paper_small.py" in markdown
    for name in ("study_summary.png", "study_train_loss.png", "analysis_consistency.png"):
        assert (out / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    # A rerun trains nothing; a lost stage output is recomputed alone.
    again = _study(demo_data, out, "--variants", "path2", "--seeds", "1", "2")
    assert again.returncode == 0 and "every run is complete" in again.stdout
    os.remove(out / "runs" / "path2_seed2" / "eval.json")
    again = _study(demo_data, out, "--variants", "path2", "--seeds", "1", "2")
    assert again.returncode == 0 and "1 stages to run" in again.stdout
    assert _json(out / "results.json")["summary"]["path2"]["valid_ppl"]["mean"] == \
        pytest.approx(summary["path2"]["valid_ppl"]["mean"])


def test_failing_stage_names_the_run_and_its_log(demo_data, tmp_path):
    result = _study(demo_data, tmp_path, "--variants", "indep_aux", "--seeds", "1",
                    "--moe-router-topk", "9")
    assert result.returncode == 2
    log = tmp_path / "runs" / "indep_aux_seed1" / "train.log"
    assert "train of indep_aux seed 1 failed" in result.stderr and str(log) in result.stderr
    assert "--moe-router-topk" in log.read_text()
    assert not (tmp_path / "results.md").exists()


def test_unknown_variant_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown \\['path3'\\]"):
        select_variants(["path3"])
    assert [v.key for v in select_variants(["path4", "indep_aux", "path4"])] == \
        ["indep_aux", "path4"]
    # Paper policy: PathMoE variants drop the load-balancing loss, the other baselines keep it.
    assert {v.aux_loss for v in VARIANTS.values() if v.routing == "path"} == {0.0}
    assert VARIANTS["mono4"].aux_loss == VARIANTS["random"].aux_loss == 0.01


def _summary(metric: str, values: dict[str, list[float]]) -> dict:
    out = {}
    for key, vals in values.items():
        mean, std = mean_std(vals)
        out[key] = {metric: {"by_seed": dict(enumerate(vals, 1)), "mean": mean, "std": std}}
    return out


def test_paired_differences_and_claim_counts_by_hand():
    # PathB4 lower than Indep-MoE on seeds 1 and 3, higher on seed 2.
    s = _summary("valid_ppl", {"indep_aux": [100.0, 110.0, 105.0], "path4": [98.0, 111.0, 101.0]})
    d = paired_difference(s, "valid_ppl", "path4", "indep_aux")
    assert d["by_seed"] == {1: -2.0, 2: 1.0, 3: -4.0}
    assert d["mean"] == pytest.approx(-5 / 3)
    assert d["std"] == pytest.approx(np.std([-2.0, 1.0, -4.0], ddof=1))
    for metric in (m for m in METRICS if m.key != "valid_ppl"):  # the others: no values
        for key in ("indep_aux", "path4"):
            s[key][metric.key] = {"by_seed": {}, "mean": float("nan"), "std": float("nan")}
    checks = {c["metric"]: c for c in claim_checks(s)}
    assert set(checks) == {"valid_ppl"}  # metrics without values are not judged
    ppl = checks["valid_ppl"]
    assert ppl["paper_direction"] == "lower" and ppl["seeds_in_paper_direction"] == 2
    assert ppl["difference_over_seed_std"] == pytest.approx(d["mean"] / np.std([98, 111, 101],
                                                                                 ddof=1))
    assert mean_std([3.0]) == (3.0, 0.0)


def test_gpu_script_mechanics_on_cpu(tmp_path):
    # The 0.9B launcher with a toy shape on the CPU: the table, ratio and memory columns.
    result = run_cli([os.path.join("benchmarks", "paper_gpu.py"), "--train-iters", "10",
                      "--output-dir", str(tmp_path), "--", "--device", "cpu",
                      "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "2",
                      "--num-query-groups", "1", "--moe-ffn-hidden-size", "32",
                      "--seq-length", "32", "--num-experts", "4", "--moe-router-topk", "2"],
                     timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["indep_aux", "path4"]
    assert rows[0].split("|")[3].strip() == "1.000"
    for name in ("indep_aux_round0", "path4_round0"):
        s = _json(tmp_path / f"{name}.json")
        assert s["peak_memory_gib"] > 0 and s["world_size"] == 1 and s["iterations"] == 10
    assert _json(tmp_path / "path4_round0.json")["routing"] == "path"
    assert _json(tmp_path / "indep_aux_round0.json")["aux_losses"]  # LBL 0.01 as in the study
    # The synthetic corpus: 32,000-token vocabulary, documents ending with EOD (id 0).
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(tmp_path / "data" / "tokenizer.json")).get_vocab_size() == 32000
    prefix = next(p for p in (tmp_path / "data").iterdir() if p.suffix == ".idx").with_suffix("")
    dataset = IndexedDataset(str(prefix))
    assert all(dataset[i][-1] == 0 and dataset[i][:-1].min() >= 2 for i in range(len(dataset)))
