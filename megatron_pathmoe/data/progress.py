"""Progress of a preprocessing run: a tqdm bar over input bytes with docs/s and tokens/s."""

from __future__ import annotations

import time
from typing import TextIO

from tqdm import tqdm


class Progress:
    """tqdm over input bytes with docs/s and tokens/s; plain lines when stderr is not a terminal."""

    def __init__(self, total_bytes: int, stream: TextIO | None, log_interval: int) -> None:
        self.start = time.perf_counter()
        self.docs = self.tokens = 0
        self.stream, self.log_interval, self.next_log = stream, log_interval, log_interval
        self._last_postfix = 0.0
        self.bar = None
        if stream is not None and stream.isatty():
            self.bar = tqdm(total=total_bytes or None, unit="B", unit_scale=True, unit_divisor=1024,
                            file=stream, dynamic_ncols=True, mininterval=0.5, desc="preprocess")

    @property
    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def rates(self) -> str:
        return f"{self.docs / self.elapsed:,.0f} docs/s, {self.tokens / self.elapsed:,.0f} tokens/s"

    def update(self, docs: int, tokens: int, nbytes: int) -> None:
        self.docs += docs
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(nbytes)
            if time.perf_counter() - self._last_postfix > 0.5:
                self._last_postfix = time.perf_counter()
                self.bar.set_postfix_str(self.rates(), refresh=False)
        elif (self.stream is not None and 0 < self.log_interval <= self.docs
              and self.docs >= self.next_log):
            self.next_log = (self.docs // self.log_interval + 1) * self.log_interval
            print(f"processed {self.docs:,} documents ({self.rates()})", file=self.stream,
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class SharedProgress:
    """Progress of a partition process: three slots of a shared array read by the parent."""

    def __init__(self, counters, index: int) -> None:
        self.counters, self.base = counters, 3 * index

    def update(self, docs: int, tokens: int, nbytes: int) -> None:
        for offset, value in enumerate((docs, tokens, nbytes)):
            self.counters[self.base + offset] += value
