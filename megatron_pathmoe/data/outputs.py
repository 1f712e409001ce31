"""Atomic outputs: datasets are written under temporary names and renamed only when complete.

A temporary name puts its suffix after ``.bin``/``.idx`` (``{final}.bin.tmp-PID``), so no
leftover of a failed or killed run is ever mistaken for a dataset; the ``.idx`` is renamed last
(and an old one removed first), so an old ``.idx`` never pairs with a new ``.bin``. The next run
removes the temporaries of runs whose process is gone.
"""

from __future__ import annotations

import glob
import os
from typing import Sequence

import numpy as np

from megatron_pathmoe.data.errors import DataError
from megatron_pathmoe.data.indexed import IndexWriter, bin_path, idx_path


class TempOutputs:
    """Temporary files of one run; ``commit()`` renames them to their final names."""

    def __init__(self, finals: dict[str, str], flag: str = "--output-prefix") -> None:
        self.finals, self.flag = finals, flag
        self.tag = f"tmp-{os.getpid()}"
        self.files = {k: self.temp_pair(p, self.tag) for k, p in finals.items()}
        self.extra: list[str] = []

    @staticmethod
    def temp_pair(prefix: str, tag: str) -> tuple[str, str]:
        # The suffix comes after .bin/.idx, so no temporary pair is ever mistaken for a dataset.
        return f"{bin_path(prefix)}.{tag}", f"{idx_path(prefix)}.{tag}"

    def partition_files(self, index: int) -> dict[str, tuple[str, str]]:
        files = {k: self.temp_pair(p, f"{self.tag}-part{index}") for k, p in self.finals.items()}
        self.extra.extend(path for pair in files.values() for path in pair)
        return files

    def prepare(self) -> None:
        """Create the output folder, check it is writable, remove temporaries of dead runs."""
        for prefix in self.finals.values():
            folder = os.path.dirname(os.path.abspath(prefix))
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as err:
                raise self.error(prefix,
                                 f"cannot create folder {folder} ({err.strerror})") from None
            if not os.access(folder, os.W_OK | os.X_OK):
                raise self.error(prefix, f"folder {folder} is not writable")
            remove_stale_temporaries(prefix)

    def error(self, prefix: str, problem: str) -> DataError:
        return DataError(f"{self.flag} {prefix!r}: {problem}; choose a writable location")

    def open_writers(self, files: dict[str, tuple[str, str]],
                     dtype: type[np.number]) -> dict[str, IndexWriter]:
        writers: dict[str, IndexWriter] = {}
        try:
            for key, (bin_file, idx_file) in files.items():
                writers[key] = IndexWriter(bin_file, idx_file, dtype)
        except OSError as err:
            for writer in writers.values():
                writer.close()
            raise self.error(self.finals[key], f"cannot write {err.filename or bin_file} "
                                               f"({err.strerror})") from None
        return writers

    def commit(self) -> None:
        for key, prefix in self.finals.items():
            tmp_bin, tmp_idx = self.files[key]
            remove_files([idx_path(prefix)])  # an old .idx must never pair with the new .bin
            os.replace(tmp_bin, bin_path(prefix))
            os.replace(tmp_idx, idx_path(prefix))

    def discard(self) -> None:
        """Best effort: never let cleanup hide the error that caused it."""
        for path in [p for pair in self.files.values() for p in pair] + self.extra:
            try:
                os.remove(path)
            except OSError:
                pass


def remove_files(paths: Sequence[str]) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(prefix: str) -> None:
    for ext in (".bin", ".idx"):
        for path in glob.glob(glob.escape(prefix + ext) + ".tmp-*"):
            pid = path.rsplit(".tmp-", 1)[1].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                remove_files([path])
