"""The exported model in the Hugging Face ecosystem: tokenizer, generate, lm-evaluation-harness."""

from __future__ import annotations

import json

import torch

from tests.convert.conftest import load_hf, megatron_logits

TASK = "pathmoe_convert_smoke"
# Four-way multiple choice over Shakespeare-like continuations; a tiny random model scores near
# chance, the point is that the harness runs end to end on the export and returns an accuracy.
DOCS = [{"question": f"{who} said unto the {whom},", "choices": [" my lord", " good sir",
                                                                 " fair lady", " thou knave"],
         "label": i % 4}
        for i, (who, whom) in enumerate([("Hamlet", "king"), ("Lear", "fool"),
                                         ("Romeo", "friar"), ("Portia", "court"),
                                         ("Macbeth", "witch"), ("Puck", "queen")])]


def test_tokenizer_and_greedy_generate_match_megatron(exported_tiny):
    from transformers import AutoTokenizer

    model, cfg, hf_dir = exported_tiny
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    assert tokenizer.is_fast and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 0
    prompt = tokenizer("To be, or not to be", return_tensors="pt")
    hf = load_hf(hf_dir)
    generated = hf.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, prompt["input_ids"].shape[1] + 6)
    # Greedy decoding with the megatron model (full re-forward per token) picks the same tokens.
    tokens = prompt["input_ids"]
    for _ in range(6):
        next_token = megatron_logits(model, tokens)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    assert torch.equal(generated, tokens)
    assert isinstance(tokenizer.decode(generated[0]), str)


def _write_task(task_dir) -> None:
    data = task_dir / "smoke.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (task_dir / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {task_dir / "cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")


def test_lm_eval_runs_a_local_multiple_choice_task(exported_tiny, tmp_path, monkeypatch):
    for flag in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(flag, "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    _write_task(tmp_path)
    _, _, hf_dir = exported_tiny
    results = simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},dtype=float32", device="cpu",
        tasks=[TASK], task_manager=TaskManager(include_path=str(tmp_path)), batch_size=4)
    metrics = results["results"][TASK]
    print(f"lm-eval {TASK}: {metrics}")
    assert 0.0 <= metrics["acc,none"] <= 1.0
    assert results["n-samples"][TASK]["effective"] == len(DOCS)


def test_transformers_save_pretrained_converts_back_bitwise(exported_tiny, tmp_path):
    """A model re-saved by transformers (e.g. after fine-tuning there) keeps the hub key layout
    and the PathMoE metadata, so it converts back to the same megatron weights and ties."""
    from megatron_pathmoe.convert import hf_to_megatron, tie_block_routers
    from megatron_pathmoe.convert.hf_files import read_config, read_weights
    from megatron_pathmoe.convert.qwen2_moe import pathmoe_config

    model, _, hf_dir = exported_tiny
    load_hf(hf_dir).save_pretrained(str(tmp_path))
    cfg = pathmoe_config(read_config(str(tmp_path)), str(tmp_path))
    assert cfg.routing == "path" and cfg.path_block_size == 2
    state = tie_block_routers(hf_to_megatron(read_weights(str(tmp_path)), cfg), cfg)
    original = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in original)
