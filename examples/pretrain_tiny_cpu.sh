#!/usr/bin/env bash
# The main job on a CPU machine: preprocess the shipped Shakespeare corpus, train a tiny
# PathMoE (8 layers, d=128, 8 experts top-2, block size 4, no aux loss) through megatron-core
# over gloo for a few minutes, print validation perplexity and the run summary. It writes
# $OUT/checkpoints/metrics.jsonl (one line per log interval) and TensorBoard events in
# $OUT/tensorboard: `tensorboard --logdir runs/`, `python tools/plot_metrics.py $OUT/checkpoints`.
# Extra arguments are passed to the trainer (e.g. --routing independent, --train-iters 50).
# NPROC=2 trains data parallel; with --tensor-/--pipeline-/--expert-model-parallel-size 2 the
# same run splits the model instead.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/tiny_cpu}
NPROC=${NPROC:-1}
MODEL=(
  --device cpu
  --num-layers 8 --hidden-size 128 --num-attention-heads 4 --num-query-groups 2
  --moe-ffn-hidden-size 256 --seq-length 256
  --num-experts 8 --moe-router-topk 2 --moe-aux-loss-coeff 0
  --routing path --path-block-size 4
  --micro-batch-size 8 --global-batch-size 16 --train-iters 150
  --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 15
  --log-interval 25 --eval-interval 75 --eval-iters 8
)
# DRY_RUN=1 (or --dry-run): layout, parameter counts and memory estimate only.
for arg in "$@"; do [[ "$arg" == --dry-run ]] && DRY_RUN=1; done
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  exec python -m megatron_pathmoe.training.pretrain "${MODEL[@]}" --dry-run \
    --dry-run-world-size "$NPROC" --tokenizer-model data/shakespeare/tokenizer.json "$@"
fi
mkdir -p "$OUT" runs/data
# Megatron indexed binaries of the shipped corpus (skipped when already there).
for split in train valid; do
  [[ -f runs/data/shakespeare_${split}_text_document.idx ]] && continue
  python tools/preprocess_data.py --input "data/shakespeare/$split.jsonl.gz" \
    --output-prefix "runs/data/shakespeare_$split" \
    --tokenizer-model data/shakespeare/tokenizer.json --append-eod --workers 2
done
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} torchrun --standalone --nproc_per_node "$NPROC" \
  -m megatron_pathmoe.training.pretrain "${MODEL[@]}" \
  --data-path runs/data/shakespeare_train_text_document \
  --valid-data-path runs/data/shakespeare_valid_text_document \
  --tokenizer-model data/shakespeare/tokenizer.json \
  --save "$OUT/checkpoints" --summary-json "$OUT/summary.json" \
  --tensorboard-dir "$OUT/tensorboard" --log-throughput "$@"
python - "$OUT/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
keys = ["routing", "path_block_size", "iterations", "final_train_loss", "valid_loss",
        "valid_perplexity", "tokens_per_second", "mean_step_seconds", "parameters"]
print("run summary:")
for k in keys:
    print(f"  {k}: {s[k]}")
print(f"  expert load max/min per layer (1.0 = uniform): "
      f"{list(zip(s['final_expert_load_max'], s['final_expert_load_min']))}")
PY
echo "metrics: $OUT/checkpoints/metrics.jsonl, TensorBoard: tensorboard --logdir $OUT/tensorboard"
echo "checkpoint: $OUT/checkpoints (next: tools/analyze_paths.py, tools/evaluate.py, tools/convert_checkpoint.py)"
