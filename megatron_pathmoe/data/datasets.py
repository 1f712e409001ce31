"""GPT training/validation datasets from megatron-core, a DP-aware batch iterator, baselines."""

from __future__ import annotations

import math
import os
import signal
from contextlib import contextmanager
from typing import Any, Iterator, Sequence
from unittest import mock

import numpy as np
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.megatron_dataset import MegatronDataset
from torch.utils.data import DataLoader, Dataset

from megatron_pathmoe.data.errors import DataError
from megatron_pathmoe.data.indexed import IndexInfo, check_indexed_dataset
from megatron_pathmoe.data.tokenizer import load_tokenizer

Blend = tuple[list[str], list[float] | None]
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def validate_data_prefix(prefix: str, flag: str) -> IndexInfo:
    """Check ``prefix.bin/.idx`` completely (see ``check_indexed_dataset``) and that it holds at
    least one document; raise DataError naming ``flag`` and the file otherwise."""
    info = check_indexed_dataset(prefix, flag)
    if info.documents == 0 or info.token_count == 0:
        raise DataError(f"{flag} {prefix!r}: the dataset holds no tokens; preprocess a "
                        "non-empty corpus with tools/preprocess_data.py")
    return info


def parse_blend(prefixes: Sequence[str] | str, flag: str = "--data-path") -> Blend:
    """Megatron blend list -> (prefixes, weights or None).

    Accepts ``["p1", "p2"]``, the weighted form ``["0.3", "p1", "0.7", "p2"]``, or one string
    holding either form separated by whitespace. Every prefix is checked on disk.
    """
    items = prefixes.split() if isinstance(prefixes, str) else [str(p) for p in prefixes]
    if not items:
        raise DataError(f"{flag}: no dataset prefix given")
    weights = _weights_or_none(items)
    paths = items[1::2] if weights is not None else items
    for path in paths:
        validate_data_prefix(path, flag)
    return paths, weights


def _weights_or_none(items: list[str]) -> list[float] | None:
    if len(items) % 2:
        return None
    try:
        weights = [float(w) for w in items[0::2]]
    except ValueError:
        return None
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise DataError(f"dataset weights must be non-negative with a positive sum, got {weights}")
    return weights


@contextmanager
def _rank_zero_if_not_distributed() -> Iterator[None]:
    # megatron-core 0.16 BlendedDataset calls torch.distributed.get_rank() on a cache miss without
    # checking is_initialized(); a single process is rank 0, so answer that.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        yield
        return
    with mock.patch.object(torch.distributed, "get_rank", lambda *a, **k: 0):
        yield


def build_gpt_datasets(
    train_prefixes: Sequence[str] | str | None,
    valid_prefixes: Sequence[str] | str | None,
    tokenizer: Any,
    seq_length: int,
    seed: int,
    train_samples: int,
    valid_samples: int,
    split: str = "98,2,0",
    cache_dir: str | None = None,
    eod_mask_loss: bool = False,
) -> tuple[Dataset, Dataset | None]:
    """Build megatron-core GPT datasets (samples of ``seq_length + 1`` tokens, shifted into
    tokens/labels).

    With ``valid_prefixes`` the two splits come from separate blends (``blend_per_split``);
    without, train and valid are carved from ``train_prefixes`` by ``split``.
    ``train_prefixes=None`` (``--mock-data``) gives megatron-core's ``MockGPTDataset`` splits:
    synthetic documents, no files. ``tokenizer`` is a loaded tokenizer (needs ``vocab_size`` and
    ``eod``) or a tokenizer.json path. Works with or without an initialised process group; with
    one, rank 0 builds the index cache first and every other rank then loads it (call on all
    ranks). ``eod_mask_loss``: megatron-core's loss mask is 0 where the input token is EOD.
    """
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    blend_kwargs: dict[str, Any] = {}  # none at all: megatron-core's mock mode
    if train_prefixes is not None:
        train_blend = parse_blend(train_prefixes, "--data-path")
        blend_kwargs = {"blend": train_blend, "split": split}
    if valid_prefixes is not None:
        if train_prefixes is None:
            raise DataError("--valid-data-path needs --data-path (--mock-data carves its own "
                            "validation split)")
        valid_blend = parse_blend(valid_prefixes, "--valid-data-path")
        blend_kwargs = {"blend_per_split": [train_blend, valid_blend, None]}
    cls = GPTDataset if blend_kwargs else MockGPTDataset
    train, valid, _ = _build(cls, [train_samples, valid_samples, 0],
                             _gpt_config(tokenizer, seq_length, seed, cache_dir, eod_mask_loss,
                                         **blend_kwargs))
    return train, valid


def build_test_dataset(prefixes: Sequence[str] | str, tokenizer: Any, seq_length: int,
                       seed: int, samples: int, cache_dir: str | None = None,
                       eod_mask_loss: bool = False) -> Dataset:
    """The ``--test-data-path`` dataset (megatron-core's test split of its own blend)."""
    blend = parse_blend(prefixes, "--test-data-path")
    config = _gpt_config(tokenizer, seq_length, seed, cache_dir, eod_mask_loss,
                         blend_per_split=[None, None, blend])
    return _build(GPTDataset, [0, 0, samples], config)[2]


def _gpt_config(tokenizer: Any, seq_length: int, seed: int, cache_dir: str | None,
                eod_mask_loss: bool, **blend_kwargs: Any) -> GPTDatasetConfig:
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        path_to_cache=cache_dir,
        mmap_bin_files=True,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,  # the model applies its own causal mask
        **blend_kwargs,
    )


def _build(cls: type, sizes: list[int], config: GPTDatasetConfig) -> list:
    # Every rank builds (rank 0 first inside the builder); no rank is left holding None.
    builder = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config)
    with _rank_zero_if_not_distributed():
        return builder.build()


class PretrainingBatchSampler:
    """Megatron-LM's ``MegatronPretrainingSampler`` order, endless: global micro-step ``j``
    covers samples ``consumed_samples + j*mbs*dp_size ...`` and rank ``r`` takes the slice
    ``r*mbs ... r*mbs + mbs`` of it, so the global order is the same for every ``dp_size``.
    Sample ``i`` reads ``dataset[i % size]``: epochs repeat the dataset's (shuffled) order."""

    def __init__(self, size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, "
                             f"dp_size={dp_size}")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
        if size == 0:
            raise ValueError("dataset is empty: increase the number of samples or the data")
        self.size, self.mbs, self.rank, self.dp = size, micro_batch_size, dp_rank, dp_size
        self.consumed = consumed_samples

    def __iter__(self) -> Iterator[list[int]]:
        base = self.consumed + self.rank * self.mbs
        while True:
            yield [i % self.size for i in range(base, base + self.mbs)]
            base += self.mbs * self.dp


def _collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in BATCH_KEYS}
    for k in ("tokens", "labels", "position_ids"):
        batch[k] = batch[k].long()
    batch["loss_mask"] = batch["loss_mask"].float()
    return batch


def make_data_iterator(
    dataset: Dataset,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    consumed_samples: int = 0,
    num_workers: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches for one data-parallel rank, in :class:`PretrainingBatchSampler`
    order, from a torch ``DataLoader`` with ``num_workers`` worker processes (``--num-workers``;
    the DataLoader keeps the sampler's order, so the batches do not depend on it). Yields
    ``tokens``, ``labels``, ``position_ids`` (int64 ``[b, s]``) and ``loss_mask`` (float32
    ``[b, s]``)."""
    sampler = PretrainingBatchSampler(len(dataset), micro_batch_size, dp_rank, dp_size,
                                      consumed_samples)
    # Its own generator: a DataLoader iterator draws a worker seed, which must not advance the
    # global RNG a resume has just restored (dropout masks would differ from the saving run).
    return iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=_collate,
                           num_workers=num_workers, persistent_workers=num_workers > 0,
                           generator=torch.Generator().manual_seed(0),
                           worker_init_fn=_ignore_sigterm if num_workers else None))


def _ignore_sigterm(worker_id: int) -> None:
    """SLURM sends SIGTERM to every process of a job step, DataLoader workers included; a
    worker killed by it would crash its rank mid-step instead of letting the rank finish the
    step and save (``--exit-signal-handler``). The rank stops its workers itself
    (:func:`shutdown_data_iterator`)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def shutdown_data_iterator(iterator: Any) -> None:
    """Stop ``iterator``'s DataLoader workers now (they ignore SIGTERM, so they must not be
    left for interpreter exit to terminate)."""
    shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's multi-worker iterator
    if shutdown is not None:
        shutdown()


def _indexed_tokens(dataset: IndexedDataset, document_ids: np.ndarray | None = None) -> np.ndarray:
    if document_ids is None:
        document_ids = np.arange(len(dataset))
    if len(document_ids) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([dataset[int(i)] for i in document_ids]).astype(np.int64)


def token_stream(source: Any) -> np.ndarray:
    """All token ids of ``source`` as one int64 array.

    ``source``: an indexed-dataset prefix (str), an ``IndexedDataset`` (all documents), a
    megatron ``GPTDataset`` (only the documents of its split), a ``BlendedDataset`` (its parts),
    or any array-like of ids.
    """
    if isinstance(source, (str, os.PathLike)):
        validate_data_prefix(os.fspath(source), "--data-path")
        return _indexed_tokens(IndexedDataset(os.fspath(source), mmap=True))
    if isinstance(source, IndexedDataset):
        return _indexed_tokens(source)
    if isinstance(source, BlendedDataset):
        return np.concatenate([token_stream(d) for d in source.datasets])
    if isinstance(source, MegatronDataset):
        return _indexed_tokens(source.dataset, np.asarray(source.indices))
    return np.asarray(source, dtype=np.int64).reshape(-1)


def unigram_cross_entropy(
    prefix_or_dataset: Any,
    vocab_size: int,
    eval_tokens: Any = None,
    smoothing: float = 1.0,
) -> float:
    """Cross-entropy (nats/token) of the unigram model fitted on ``prefix_or_dataset``.

    The unigram distribution is estimated from the training tokens with add-``smoothing``
    (Laplace) counts over all ``vocab_size`` ids, so unseen ids keep a finite cost. It is scored
    on ``eval_tokens`` (same accepted types as :func:`token_stream`; default: the training tokens
    themselves). A language model that learns anything must beat ``exp`` of this perplexity.
    """
    train = token_stream(prefix_or_dataset)
    held = train if eval_tokens is None else token_stream(eval_tokens)
    if held.size == 0 or train.size == 0:
        raise ValueError("unigram_cross_entropy needs non-empty train and eval token streams")
    if train.max() >= vocab_size or held.max() >= vocab_size:
        raise ValueError(f"token id >= vocab_size ({vocab_size}); wrong tokenizer for this data?")
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + smoothing
    log_p = np.log(counts / counts.sum())
    held_counts = np.bincount(held, minlength=vocab_size)
    return float(-(held_counts * log_p).sum() / held.size)
