"""Megatron-LM's ``--rampup-batch-size START INCREMENT SAMPLES``: the global batch starts at
START sequences and grows by INCREMENT every SAMPLES / ((--global-batch-size - START) /
INCREMENT) consumed samples until it reaches ``--global-batch-size``. The size of each step is
megatron-core's ``RampupBatchsizeNumMicroBatchesCalculator``'s for the samples consumed before
it, so a resumed run (which restores the consumed samples) continues the ramp where it was. As
in Megatron-LM only a sample budget (``--train-samples``) may ramp, and the iteration count
is Megatron-LM's ``update_train_iters``: the ramp's steps, then whole global batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_pathmoe.config import ConfigError

FLAG = "--rampup-batch-size"


@dataclass(frozen=True)
class BatchRampup:
    start: int
    increment: int
    samples: int

    @classmethod
    def from_flag(cls, values: list[int] | None) -> "BatchRampup | None":
        return None if not values else cls(*values)

    def validate(self, global_batch_size: int) -> None:
        """Megatron-core's rules, as one-line errors naming the flag."""
        if min(self.start, self.increment) < 1 or self.samples < 0:
            raise ConfigError(f"{FLAG} {self.start} {self.increment} {self.samples}: START and "
                              "INCREMENT must be >= 1 and SAMPLES >= 0")
        span = global_batch_size - self.start
        if span <= 0 or span % self.increment:
            raise ConfigError(
                f"{FLAG} {self.start} {self.increment} {self.samples}: START must be below "
                f"--global-batch-size {global_batch_size} and INCREMENT divide the difference "
                f"({span})")


class GlobalBatchSchedule:
    """The global batch size of every step: ``--global-batch-size``, or the ramp's."""

    def __init__(self, global_batch_size: int, rampup: BatchRampup | None = None) -> None:
        self.global_batch_size, self.rampup = global_batch_size, rampup
        self._calculator: Any = None
        if rampup is not None:
            rampup.validate(global_batch_size)
            from megatron.core.num_microbatches_calculator import (
                RampupBatchsizeNumMicroBatchesCalculator,
            )

            # Sizes only (micro-batch 1, DP 1, no logging rank): divisibility is checked by
            # validate_divisible for the real layout.
            self._calculator = RampupBatchsizeNumMicroBatchesCalculator(
                global_batch_size, 1, 1, False, 1, rampup.start, rampup.increment,
                rampup.samples)

    def size(self, consumed_samples: int) -> int:
        """The global batch of the step that starts after ``consumed_samples``."""
        if self._calculator is None:
            return self.global_batch_size
        self._calculator.update(consumed_samples, consistency_check=False)
        return self._calculator.get_current_global_batch_size()

    def sizes(self) -> list[int]:
        """Every size a step can have, smallest first."""
        if self.rampup is None:
            return [self.global_batch_size]
        return list(range(self.rampup.start, self.global_batch_size + 1, self.rampup.increment))

    def iterations(self, train_samples: int) -> int:
        """Megatron-LM's iteration count for ``--train-samples``: the ramp's steps (while the
        consumed samples are within the ramp and the budget), then whole global batches."""
        if self.rampup is None:
            return train_samples // self.global_batch_size
        iterations = consumed = 0
        while consumed <= self.rampup.samples and consumed <= train_samples:
            consumed += self.size(consumed)
            iterations += 1
        if train_samples > consumed:
            iterations += (train_samples - consumed) // self.global_batch_size
        return iterations

    def samples(self, iterations: int, consumed: int = 0) -> int:
        """The samples ``iterations`` steps consume after ``consumed``."""
        start = consumed
        for _ in range(iterations):
            consumed += self.size(consumed)
        return consumed - start

    def validate_divisible(self, micro_batch_size: int, data_parallel_size: int) -> None:
        """Every size must be whole micro-batches on every data-parallel rank."""
        unit = micro_batch_size * data_parallel_size
        bad = [s for s in self.sizes() if s % unit]
        if bad:
            raise ConfigError(
                f"{FLAG}: global batch {bad[0]} is not divisible by --micro-batch-size "
                f"{micro_batch_size} x data-parallel size {data_parallel_size}; choose START "
                f"and INCREMENT as multiples of {unit}")
