#!/usr/bin/env bash
# The paper's 0.9B model (0.37B active; Appendix B): 24 layers, d=1280, 20 heads / 4 KV heads,
# 16 experts of FFN 768, top-4, PathB4 routing, no aux loss, seq 4096, BF16, AdamW(0.9, 0.95),
# weight decay 0.1, cosine schedule, 2000 warm-up steps. One node, data parallel:
#
#   DATA=/data/fineweb_text_document TOKENIZER=/models/llama2/tokenizer.json \
#     bash examples/pretrain_pathmoe_0.9b.sh
#
# ROUTING=independent AUX=0.01 gives the paper's Indep-MoE baseline. The paper trains
# 400k steps at global batch 1024; TRAIN_ITERS/GBS override (e.g. a few hundred steps to
# measure tokens/s/GPU). The paper's text does not give the peak learning rate legibly;
# LR defaults to 4e-4 (state what you use when you compare).
set -euo pipefail
: "${DATA:?set DATA to a .bin/.idx prefix}" "${TOKENIZER:?set TOKENIZER to a tokenizer.json}"
NPROC=${NPROC:-8}
ROUTING=${ROUTING:-path}
AUX=${AUX:-0}
torchrun --nnodes "${NNODES:-1}" --nproc_per_node "$NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
  -m megatron_pathmoe.training.pretrain \
  --data-path "$DATA" --tokenizer-model "$TOKENIZER" --split 995,5,0 \
  --num-layers 24 --hidden-size 1280 --num-attention-heads 20 --num-query-groups 4 \
  --moe-ffn-hidden-size 768 --seq-length 4096 \
  --num-experts 16 --moe-router-topk 4 --moe-aux-loss-coeff "$AUX" \
  --routing "$ROUTING" --path-block-size "${BLOCK:-4}" \
  --expert-model-parallel-size "${EP:-1}" --moe-token-dispatcher-type alltoall \
  --use-distributed-optimizer --bf16 \
  --micro-batch-size "${MBS:-4}" --global-batch-size "${GBS:-1024}" \
  --train-iters "${TRAIN_ITERS:-400000}" --lr "${LR:-4e-4}" --min-lr "${MIN_LR:-4e-5}" \
  --lr-warmup-iters 2000 --lr-decay-style cosine --weight-decay 0.1 \
  --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 \
  --log-interval 10 --eval-interval 2000 --eval-iters 20 \
  --transformer-impl "${TRANSFORMER_IMPL:-local}" "$@"
