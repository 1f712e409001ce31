"""The training run's data: this data-parallel rank's train and validation iterators over
megatron-core's GPT datasets."""

from __future__ import annotations

from megatron_pathmoe.config import PathMoEConfig
from megatron_pathmoe.training.arguments import TrainingConfig


def build_data_iterators(model_cfg: PathMoEConfig, train: TrainingConfig,
                         consumed_samples: int = 0):
    """This data-parallel rank's train and validation iterators (one per model chunk under an
    interleaved pipeline); the train one starts after ``consumed_samples`` (resume)."""
    from megatron.core import parallel_state

    from megatron_pathmoe.data import build_gpt_datasets, load_tokenizer, make_data_iterator

    tokenizer = load_tokenizer(train.tokenizer_spec())
    evals = train.train_iters // train.eval_interval + 1 if train.eval_interval else 1
    train_ds, valid_ds = build_gpt_datasets(
        train.data_path, train.valid_data_path or None, tokenizer, model_cfg.seq_length,
        train.seed, train_samples=train.train_iters * train.global_batch_size,
        valid_samples=evals * train.eval_iters * train.global_batch_size, split=train.split,
        cache_dir=train.data_cache_path)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    # The interleaved schedule reads one iterator per model chunk; each pipeline stage reads
    # the whole batch (the first stage uses the tokens, the last the labels and loss mask).
    vpp = model_cfg.virtual_pipeline_model_parallel_size

    def iterators(dataset, consumed: int = 0):
        def make():
            return make_data_iterator(dataset, train.micro_batch_size, dp_rank, dp_size,
                                      consumed_samples=consumed)
        return make() if vpp is None else [make() for _ in range(vpp)]

    return iterators(train_ds, consumed_samples), iterators(valid_ds)
