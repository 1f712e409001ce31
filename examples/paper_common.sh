# Sourced by the paper-scale examples (pretrain_pathmoe_0.9b.sh, pretrain_pathmoe_16b.sh).
#
# paper_launch VOCAB_SIZE TRAINER_ARGS... (later flags win) adds the layout flags (TP, PP, VPP, EP), the paper's
# training recipe (AdamW 0.9/0.95, weight decay 0.1, cosine, 2000 warm-up steps, BF16,
# distributed optimizer, alltoall dispatcher) and then either
#   * DRY_RUN=1 (or --dry-run among the arguments): checks the layout for NNODES x
#     GPUS_PER_NODE ranks and prints parameter counts and the per-GPU memory estimate, with
#     VOCAB_SIZE standing in for the tokenizer; no GPU, data or process group needed;
#   * otherwise: torchrun with NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE
#     (run the script on every node), reading DATA and TOKENIZER.
# routing_flags: --routing ROUTING (default path) and, for the variants with router blocks,
# --path-block-size BLOCK (default 4); independent, random, recurrent and lowrank take none.
routing_flags() {
  local routing=${ROUTING:-path}
  echo "--routing $routing"
  case "$routing" in path|mono|xmoe) echo "--path-block-size ${BLOCK:-4}" ;; esac
}

paper_launch() {
  local vocab_size=$1; shift
  local nnodes=${NNODES:-1} gpus=${GPUS_PER_NODE:-8} tp=${TP:-1}
  local args=(
    --tensor-model-parallel-size "$tp" --pipeline-model-parallel-size "${PP:-1}"
    --expert-model-parallel-size "${EP:-1}" --use-distributed-optimizer
    --moe-token-dispatcher-type alltoall --bf16
    --lr-warmup-iters 2000 --lr-decay-style cosine --weight-decay 0.1
    --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0
    --log-interval 10 --eval-interval 2000 --eval-iters 20
    --transformer-impl "${TRANSFORMER_IMPL:-local}")
  if [[ -n "${VPP:-}" ]]; then args+=(--virtual-pipeline-model-parallel-size "$VPP"); fi
  if (( tp > 1 )); then args+=(--sequence-parallel); fi
  # transformer-engine: its grouped GEMM runs all local experts in one kernel (Megatron-LM's flag)
  if [[ "${TRANSFORMER_IMPL:-local}" == transformer_engine ]]; then args+=(--moe-grouped-gemm); fi
  local arg dry_run=${DRY_RUN:-0}
  for arg in "$@"; do [[ "$arg" == --dry-run ]] && dry_run=1; done
  if [[ "$dry_run" == 1 ]]; then
    python -m megatron_pathmoe.training.pretrain "${args[@]}" --dry-run \
      --dry-run-world-size $((nnodes * gpus)) --dry-run-vocab-size "${VOCAB_SIZE:-$vocab_size}" \
      "$@"
    return
  fi
  : "${DATA:?set DATA to a .bin/.idx prefix}" "${TOKENIZER:?set TOKENIZER to a tokenizer.json}"
  torchrun --nnodes "$nnodes" --node-rank "${NODE_RANK:-0}" --nproc-per-node "$gpus" \
    --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
    -m megatron_pathmoe.training.pretrain "${args[@]}" \
    --data-path "$DATA" --tokenizer-model "$TOKENIZER" --split 995,5,0 "$@"
}
