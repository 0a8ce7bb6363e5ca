"""What every `gen` command shares: one-line errors (CliError, a Parser that raises them) and quiet libraries."""

from __future__ import annotations

import argparse
import sys


class CliError(Exception):
    """Bad input: printed as one line on stderr, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (via CliError), not a usage block."""

    def error(self, message: str):
        raise CliError(f"{message} (see `{self.prog} --help`)")


def err(message: str) -> None:
    print(f"gen: {message}", file=sys.stderr)


def quiet_libraries() -> None:
    # Library progress bars and load-time warnings are noise on a command line.
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for lib in (dlog, tlog):
        lib.disable_progress_bar()
        lib.set_verbosity_error()
