"""The directory protocol of a ``--save`` root: which directory is a checkpoint, which one is
the newest, and how a save becomes visible atomically.

Layout::

    <root>/latest_checkpointed_iteration.txt   iteration of the newest complete checkpoint
    <root>/iter_0000100/                       megatron dist checkpoint (torch_dist) +
                                               pathmoe_run.json + copies of the tokenizer's
                                               files, whatever its type (tokenizer.json;
                                               vocab.json + merges.txt; tokenizer.model)
    <root>/.tmp_iter_0000200/                  a save in progress (never loaded)

Atomicity: every rank writes into the temporary directory; once all ranks are done (the
barrier inside ``dist_checkpointing.save``) rank 0 writes ``pathmoe_run.json``, renames the
directory to its final name and only then replaces the tracker file (:func:`publish`). A save
interrupted at any point leaves the previous checkpoint as "latest", and a directory without
``metadata.json`` and ``pathmoe_run.json`` is never taken for a checkpoint.
"""

from __future__ import annotations

import glob
import os
import shutil

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RUN_FILE = "pathmoe_run.json"
TOKENIZER_FILE = "tokenizer.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the path and what to do."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def tmp_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f".tmp_iter_{iteration:07d}")


def is_complete_checkpoint(path: str) -> bool:
    """A finished save: megatron's ``metadata.json`` (written after all shards) and ours."""
    return (os.path.isfile(os.path.join(path, "metadata.json"))
            and os.path.isfile(os.path.join(path, RUN_FILE)))


def read_tracker(root: str) -> int | None:
    tracker = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(tracker):
        return None
    text = open(tracker).read().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{tracker}: expected an iteration number, found {text!r}; "
                              "delete the file to fall back to the newest complete "
                              "iter_XXXXXXX directory") from None


def resolve_checkpoint_dir(path: str) -> str:
    """The checkpoint directory meant by ``path``: an ``iter_XXXXXXX`` directory itself, or a
    ``--save`` root (its tracker file; without one, the newest complete ``iter_*``)."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist; pass a --save directory of "
                              "a training run or one of its iter_XXXXXXX folders")
    found = find_checkpoint(path)
    if found is None:
        raise CheckpointError(f"{path!r} holds no complete checkpoint (no {TRACKER_FILE} and no "
                              f"iter_XXXXXXX folder with metadata.json and {RUN_FILE}); check "
                              "the --load path or train with --save first")
    return found


def find_checkpoint(path: str) -> str | None:
    """Like :func:`resolve_checkpoint_dir`, but ``None`` when ``path`` is missing or holds no
    checkpoint yet (the first launch of a ``--save X --load X`` job, or one killed before its
    first save completed). A damaged checkpoint still raises: training from scratch over it
    would silently lose the run."""
    if not os.path.exists(path):
        return None
    if is_complete_checkpoint(path):
        return path
    if os.path.basename(os.path.normpath(path)).startswith(("iter_", ".tmp_iter_")):
        raise CheckpointError(f"{path!r} is an incomplete checkpoint (interrupted save: no "
                              f"metadata.json or {RUN_FILE}); load its parent directory to get "
                              "the newest complete one")
    iteration = read_tracker(path)
    if iteration is not None:
        chosen = iteration_dir(path, iteration)
        if not is_complete_checkpoint(chosen):
            raise CheckpointError(f"{os.path.join(path, TRACKER_FILE)} names iteration "
                                  f"{iteration}, but {chosen} is missing or incomplete")
        return chosen
    complete = sorted(d for d in glob.glob(os.path.join(path, "iter_*"))
                      if is_complete_checkpoint(d))
    return complete[-1] if complete else None


def prepare_tmp_dir(root: str, iteration: int) -> str:
    """A fresh temporary directory for the save of ``iteration`` (rank 0 only)."""
    os.makedirs(root, exist_ok=True)
    if not os.access(root, os.W_OK):
        raise CheckpointError(f"--save {root!r} is not writable")
    tmp = tmp_dir(root, iteration)
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted save
    os.makedirs(tmp)
    return tmp


def publish(root: str, iteration: int, keep_last: int | None = None) -> str:
    """Make the finished temporary directory the checkpoint of ``iteration`` and the newest
    one, then drop all but the ``keep_last`` newest (rank 0 only)."""
    final = iteration_dir(root, iteration)
    shutil.rmtree(final, ignore_errors=True)  # re-saving an iteration replaces it
    os.replace(tmp_dir(root, iteration), final)
    write_atomic(os.path.join(root, TRACKER_FILE), f"{iteration}\n")
    if keep_last:
        _prune(root, keep_last)
    return final


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(root: str, keep_last: int) -> None:
    complete = sorted(d for d in glob.glob(os.path.join(root, "iter_*"))
                      if is_complete_checkpoint(d))
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
