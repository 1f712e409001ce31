"""What every command-line entry point shares: rank-0 printing, the one warning filter,
one-line errors and a failure line that names the rank."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import warnings

from megatron_pathmoe.runtime.distributed import is_rank0

# megatron-core warns at import about every optional GPU package it cannot find (TE, apex; the
# implementation is chosen explicitly by flags), and megatron-core 0.16 / torch 2.13 print
# deprecations on every checkpoint load: the user can act on none of them.
_IGNORED_WARNINGS = (
    r".*(Transformer Engine|Apex|apex|transformer_engine).*not installed.*",
    r".*(full scope is deprecated|`load_state_dict` is deprecated|Please use DTensor).*",
)


def quiet_warnings() -> None:
    """The one warning filter of every entry point; call it before megatron is imported to
    also silence megatron's import-time notes. Library UserWarnings (layout hints) and
    FutureWarnings say nothing the user can act on either."""
    for pattern in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(megatron|torch)\.")
    warnings.filterwarnings("ignore", category=FutureWarning)


def log(message: str) -> None:
    """Print once per job (global rank 0)."""
    if is_rank0():
        print(message, flush=True)


def warn(message: str) -> None:
    log(f"WARNING: {message}")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the whole usage (dozens of lines) before an error; users need the
    error, which names the flag and the fix."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def report_failure(prog: str, err: BaseException, *, traceback: bool = True) -> int:
    """One line naming the rank and the error, after the traceback when ``traceback``; the
    non-zero exit makes torchrun stop the other ranks."""
    if traceback:
        import traceback as tb

        tb.print_exc()
    print(f"{prog}: rank {os.environ.get('RANK', '0')} on {socket.gethostname()} failed: "
          f"{type(err).__name__}: {err}", file=sys.stderr, flush=True)
    return 1
