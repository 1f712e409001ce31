"""The training run's data: this data-parallel rank's train, validation and test iterators
over megatron-core's GPT datasets (``--data-path`` or ``--mock-data``; ``--test-data-path``),
read through a torch ``DataLoader`` with ``--num-workers`` workers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_pathmoe.config import PathMoEConfig
from megatron_pathmoe.training.arguments import TrainingConfig


@dataclass
class DataIterators:
    """One iterator per model chunk under an interleaved pipeline, else one; ``test`` is None
    without ``--test-data-path``."""

    train: Any
    valid: Any
    test: Any = None

    def close(self) -> None:
        """Stop the DataLoader workers (``--num-workers``)."""
        from megatron_pathmoe.data.datasets import shutdown_data_iterator

        for its in (self.train, self.valid, self.test):
            for it in its if isinstance(its, list) else [its]:
                shutdown_data_iterator(it)


def build_data_iterators(model_cfg: PathMoEConfig, train: TrainingConfig,
                         consumed_samples: int = 0) -> DataIterators:
    """This data-parallel rank's iterators; the train one starts after ``consumed_samples``
    (resume)."""
    from megatron.core import parallel_state

    from megatron_pathmoe.data import build_gpt_datasets, load_tokenizer, make_data_iterator
    from megatron_pathmoe.data.datasets import build_test_dataset

    tokenizer = load_tokenizer(train.tokenizer_spec())
    evals = train.train_iters // train.eval_interval + 1 if train.eval_interval else 1
    eval_samples = train.eval_iters * train.global_batch_size
    mock = train.cluster.mock_data
    train_ds, valid_ds = build_gpt_datasets(
        None if mock else train.data_path, train.valid_data_path or None, tokenizer,
        model_cfg.seq_length, train.seed,
        train_samples=train.batch_schedule().samples(train.train_iters),
        valid_samples=evals * eval_samples, split=train.split, cache_dir=train.data_cache_path,
        eod_mask_loss=train.eod_mask_loss)
    test_ds = (build_test_dataset(train.cluster.test_data_path, tokenizer, model_cfg.seq_length,
                                  train.seed, eval_samples, cache_dir=train.data_cache_path,
                                  eod_mask_loss=train.eod_mask_loss)
               if train.cluster.test_data_path else None)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    # The interleaved schedule reads one iterator per model chunk; each pipeline stage reads
    # the whole batch (the first stage uses the tokens, the last the labels and loss mask).
    vpp = model_cfg.virtual_pipeline_model_parallel_size

    def iterators(dataset, consumed: int = 0):
        def make():
            return make_data_iterator(dataset, train.micro_batch_size, dp_rank, dp_size,
                                      consumed_samples=consumed,
                                      num_workers=train.cluster.num_workers)
        return make() if vpp is None else [make() for _ in range(vpp)]

    return DataIterators(iterators(train_ds, consumed_samples), iterators(valid_ds),
                         iterators(test_ds) if test_ds is not None else None)
