"""Evaluation forwards over a token stream: data, micro-batch plan and perplexity.

The first ``num_tokens`` tokens of a dataset are cut into consecutive sequences of
``seq_length`` tokens (each predicting the token after it, so the stream holds one token more),
as megatron's GPT datasets do without shuffling. Sequences are split into micro-batches dealt
round-robin to the data-parallel ranks; every rank runs the same number of micro-batches
(padding ones have a zero loss mask and are not recorded), because expert-parallel dispatch is
collective. The forwards go through megatron's forward-backward schedule with
``forward_only=True``, so any pipeline layout works.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from megatron_pathmoe.analysis.recorder import Slot

DATA_FLAG = "--data"
TEXT_BLOCK_CHARS = 1 << 20


def _indexed_tokens(prefix: str, count: int) -> np.ndarray:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix, mmap=True)
    parts, total = [], 0
    for i in range(len(dataset)):
        if total >= count:
            break
        doc = np.asarray(dataset[i], dtype=np.int64)[:count - total]
        parts.append(doc)
        total += doc.size
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _text_documents(path: str) -> Iterator[str]:
    """jsonl(.gz): the "text" field of each line; anything else: blocks of the plain text."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        if path.endswith((".jsonl", ".jsonl.gz")):
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ValueError(f"{DATA_FLAG} {path}:{number}: expected a JSON object "
                                         'with a "text" field') from None
            return
        while True:
            block = f.read(TEXT_BLOCK_CHARS) + f.readline()  # end blocks at a line break
            if not block:
                return
            yield block


def _text_tokens(path: str, count: int, tokenizer) -> np.ndarray:
    jsonl = path.endswith((".jsonl", ".jsonl.gz"))
    parts, total = [], 0
    for text in _text_documents(path):
        ids = tokenizer.tokenize(text) + ([tokenizer.eod] if jsonl else [])
        parts.append(np.asarray(ids, np.int64))
        total += len(ids)
        if total >= count:
            break
    return np.concatenate(parts)[:count] if parts else np.zeros(0, np.int64)


def check_data_source(source: str) -> bool:
    """True for an indexed dataset prefix, False for a text file; ValueError naming the flag
    otherwise."""
    if os.path.isfile(source + ".bin") and os.path.isfile(source + ".idx"):
        return True
    if os.path.isfile(source) and not source.endswith((".bin", ".idx")):
        return False
    hint = f" (give the prefix without the extension: {source[:-4]!r})" \
        if source.endswith((".bin", ".idx")) else ""
    raise ValueError(f"{DATA_FLAG} {source!r}: neither an indexed dataset (PREFIX.bin + "
                     f"PREFIX.idx) nor a text file{hint}; make one with "
                     "tools/preprocess_data.py or pass a .txt/.jsonl file")


def read_token_stream(source: str, count: int, tokenizer) -> np.ndarray:
    """The first ``count`` token ids of ``source``: a megatron indexed dataset prefix (its
    ``.bin``/``.idx``), a ``.jsonl``/``.jsonl.gz`` file (a "text" field per line, documents
    end with EOD) or a plain text file, tokenized with ``tokenizer``."""
    if check_data_source(source):
        tokens = _indexed_tokens(source, count)
    else:
        tokens = _text_tokens(source, count, tokenizer)
    if tokens.size and tokens.max() >= tokenizer.vocab_size:
        raise ValueError(f"{DATA_FLAG} {source!r} holds token id {int(tokens.max())}, outside "
                         f"the checkpoint's vocabulary ({tokenizer.vocab_size}); it was made "
                         "with another tokenizer")
    return tokens


@dataclass
class TokenWindows:
    """``num_samples`` consecutive sequences of ``seq_length`` tokens of ``stream``."""

    stream: np.ndarray
    seq_length: int

    @classmethod
    def from_stream(cls, stream: np.ndarray, seq_length: int, source: str) -> "TokenWindows":
        if stream.size < seq_length + 1:
            raise ValueError(f"{DATA_FLAG} {source!r} gave {stream.size} tokens, fewer than one "
                             f"sequence of {seq_length} (+1 label); use more data or a shorter "
                             "--seq-length")
        samples = (stream.size - 1) // seq_length
        return cls(stream[:samples * seq_length + 1], seq_length)

    @property
    def num_samples(self) -> int:
        return (self.stream.size - 1) // self.seq_length

    @property
    def num_tokens(self) -> int:
        return self.num_samples * self.seq_length

    def inputs(self) -> np.ndarray:
        """The token ids the model reads (the recording's ``tokens``)."""
        return self.stream[:self.num_tokens]

    def batch(self, slot: Slot | None, micro_batch_size: int) -> dict[str, torch.Tensor]:
        """Megatron's batch dict for one micro-batch; padding rows have a zero loss mask."""
        first, valid = (slot.start // self.seq_length, slot.samples) if slot else (0, 0)
        rows = [min(first + i, self.num_samples - 1) for i in range(micro_batch_size)]
        S = self.seq_length
        data = np.stack([self.stream[r * S:r * S + S + 1] for r in rows])
        mask = torch.zeros(micro_batch_size, S)
        mask[:valid] = 1.0
        return {"tokens": torch.from_numpy(data[:, :-1].copy()),
                "labels": torch.from_numpy(data[:, 1:].copy()),
                "loss_mask": mask,
                "position_ids": torch.arange(S).expand(micro_batch_size, S).contiguous()}


def microbatch_plan(num_samples: int, seq_length: int, micro_batch_size: int, dp_size: int,
                    dp_rank: int) -> list[Slot | None]:
    """This rank's micro-batches: global micro-batch g goes to rank g % dp_size; every rank
    gets ceil(total / dp_size) entries (None for padding)."""
    total = math.ceil(num_samples / micro_batch_size)
    plan: list[Slot | None] = []
    for i in range(math.ceil(total / dp_size)):
        g = i * dp_size + dp_rank
        first = g * micro_batch_size
        plan.append(Slot(first * seq_length, min(micro_batch_size, num_samples - first))
                    if g < total else None)
    return plan


@torch.no_grad()
def evaluate_loss(model_chunks: list[torch.nn.Module], windows: TokenWindows,
                  plan: list[Slot | None], micro_batch_size: int,
                  progress: "tqdm | None" = None, group: int = 8) -> float:  # noqa: F821
    """Mean next-token loss (nats) over the plan's tokens on all ranks; ``group``
    micro-batches per schedule call (the pipeline fills within a call). ``progress`` (a tqdm
    bar) advances by one per micro-batch of this rank."""
    from megatron_pathmoe.model import forward_backward, loss_sums
    from megatron_pathmoe.runtime import all_reduce_to_cpu

    sums = torch.zeros(2, dtype=torch.float64)
    for start in range(0, len(plan), group):
        slots = plan[start:start + group]
        batches = iter([windows.batch(slot, micro_batch_size) for slot in slots])
        sums += loss_sums(forward_backward(
            model_chunks, batches, num_microbatches=len(slots), seq_length=windows.seq_length,
            micro_batch_size=micro_batch_size, forward_only=True))
        if progress is not None:
            progress.update(len(slots))
    # Only last-stage ranks hold reports; TP ranks repeat them, which the ratio cancels.
    sums = all_reduce_to_cpu(sums)
    if sums[1] == 0:
        raise RuntimeError("no token was evaluated")
    return float(sums[0] / sums[1])
