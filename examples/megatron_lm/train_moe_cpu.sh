#!/bin/bash
# A Megatron-LM MoE launch script, written as Megatron-LM's own MoE example
# (examples/mixtral/train_mixtral_8x7b_distributed.sh: the same flag groups and flags), shrunk
# to CPU size (2 processes over gloo, expert parallel 2), with one change: the entry point.
#
#   Megatron-LM:       torchrun ${DISTRIBUTED_ARGS[@]} pretrain_gpt.py ...
#   megatron-pathmoe:  torchrun ${DISTRIBUTED_ARGS[@]} $(command -v pathmoe-pretrain) --routing path ...
#
# Usage: bash examples/megatron_lm/train_moe_cpu.sh CHECKPOINT_PATH TOKENIZER_MODEL DATA_PATH [flags]
# e.g. with the demo corpus (bash examples/pretrain_tiny_cpu.sh preprocesses it):
#   bash examples/megatron_lm/train_moe_cpu.sh runs/megatron_lm data/shakespeare/tokenizer.json \
#     runs/data/shakespeare_train_text_document
# Extra flags are appended (e.g. --summary-json runs/megatron_lm/summary.json).
# On GPUs: raise the sizes back to the original's and add --moe-grouped-gemm (transformer-engine).

export CUDA_DEVICE_MAX_CONNECTIONS=1

GPUS_PER_NODE=${GPUS_PER_NODE:-2}
# Change for multinode config
MASTER_ADDR=${MASTER_ADDR:-"localhost"}
MASTER_PORT=${MASTER_PORT:-"6000"}
NNODES=${NNODES:-"1"}
NODE_RANK=${RANK:-"0"}
WORLD_SIZE=$(($GPUS_PER_NODE*$NNODES))

CHECKPOINT_PATH=$1
TOKENIZER_MODEL=$2
DATA_PATH=$3
shift 3

DISTRIBUTED_ARGS=(
    --nproc_per_node $GPUS_PER_NODE
    --nnodes $NNODES
    --node_rank $NODE_RANK
    --master_addr $MASTER_ADDR
    --master_port $MASTER_PORT
)

MODEL_ARGS=(
    --use-mcore-models
    --disable-bias-linear
    --seq-length 64
    --max-position-embeddings 256
    --num-layers 4
    --hidden-size 64
    --ffn-hidden-size 128
    --num-attention-heads 4
    --init-method-std 0.01
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --normalization RMSNorm
    --position-embedding-type rope
    --swiglu
    --untie-embeddings-and-output-weights
    --group-query-attention
    --num-query-groups 2
    --no-masked-softmax-fusion
    --no-position-embedding
    --rotary-base 1000000
)

MOE_ARGS=(
    --num-experts 4
    --moe-router-topk 2
    --moe-router-load-balancing-type aux_loss
    --moe-aux-loss-coeff 1e-2
    --moe-token-dispatcher-type alltoall
    --overlap-param-gather
    --overlap-grad-reduce
)

DATA_ARGS=(
    --tokenizer-type HuggingFaceTokenizer
    --tokenizer-model ${TOKENIZER_MODEL}
    --data-path $DATA_PATH
    --split 949,50,1
)

TRAINING_ARGS=(
    --micro-batch-size 2
    --global-batch-size 8
    --lr 1e-3
    --train-iters 5
    --lr-decay-iters 4
    --lr-decay-style cosine
    --min-lr 1.0e-4
    --weight-decay 0.1
    --lr-warmup-iters 1
    --clip-grad 1.0
    --bf16
)

MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size 1
    --pipeline-model-parallel-size 1
    --expert-model-parallel-size 2
    --use-distributed-optimizer
    --sequence-parallel
)

LOGGING_ARGS=(
    --log-interval 1 \
    --save-interval 10000 \
    --eval-interval 1000 \
    --eval-iters 2 \
    --save $CHECKPOINT_PATH \
    --load $CHECKPOINT_PATH \
    --tensorboard-dir "${CHECKPOINT_PATH}/tensorboard" \
    --no-load-optim \
    --no-load-rng
)

torchrun ${DISTRIBUTED_ARGS[@]} $(command -v pathmoe-pretrain) --routing path \
    ${MODEL_ARGS[@]} \
    ${MOE_ARGS[@]} \
    ${DATA_ARGS[@]} \
    ${TRAINING_ARGS[@]} \
    ${MODEL_PARALLEL_ARGS[@]} \
    ${LOGGING_ARGS[@]} "$@"
