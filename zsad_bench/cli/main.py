"""``zsad-bench`` entry point: dispatches to the command modules and turns errors into one line.

Core commands live in :data:`COMMAND_MODULES`; a method package adds its own commands (SPG's
``atoms``) through the entry-point group ``zsad_bench.commands``, whose value is a module defining
``add_parser(subparsers)`` like the core ones.

When the reader of standard output goes away (``zsad-bench table ... | head``), the command stops
quietly with exit status 141, what a shell reports for a command ended by SIGPIPE (``yes | head``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import select
import sys
import traceback
import warnings
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import NoReturn

from zsad_bench import __version__
from zsad_bench.errors import ZsadError

# Each module defines ``add_parser(subparsers)`` and sets ``func`` on its parser(s).
COMMAND_MODULES = (
    "zsad_bench.cli.run",
    "zsad_bench.cli.listing",
    "zsad_bench.cli.data",
    "zsad_bench.cli.table",
    "zsad_bench.cli.bench",
    "zsad_bench.cli.cache",
    "zsad_bench.cli.ablate",
    "zsad_bench.cli.sweep",
    "zsad_bench.cli.show",
    "zsad_bench.cli.plot",
    "zsad_bench.cli.report",
)
COMMAND_GROUP = "zsad_bench.commands"
SIGPIPE_STATUS = 128 + 13  # 141: a shell's status for a command ended by SIGPIPE


class _Parser(argparse.ArgumentParser):
    """Usage errors as the one line every other error is (``zsad-bench: error: ...``), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"zsad-bench: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="zsad-bench",
        description="Benchmark harness for zero-shot anomaly detection and segmentation.",
    )
    parser.add_argument("--version", action="version", version=f"zsad-bench {__version__}")
    parser.add_argument("--debug", action="store_true", help="print full tracebacks (also accepted after COMMAND)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).add_parser(sub)
    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        try:
            ep.load().add_parser(sub)
        except Exception as exc:  # a broken plugin must not take the core commands down
            print(f"zsad-bench: warning: command plugin '{ep.name}' ({ep.value}) not loaded: {exc}", file=sys.stderr)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command in ``argv`` (default: ``sys.argv[1:]``); the exit status.

    ``args.argv`` keeps the command line as parsed (without ``--debug``), for a command that needs to
    know which options were given (``run --config``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if not debug:  # a warning is one line too (with --debug: Python's, with the file and source line)
        warnings.formatwarning = _one_line_warning
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe fails here, inside the try, not in the flush at exit
        return status
    except BrokenPipeError:
        if not _stdout_gone():  # another pipe (a worker's, a connection's): a real error
            raise
        # As https://docs.python.org/3/library/signal.html#note-on-sigpipe does: the reader is gone, so
        # point stdout at devnull (the interpreter's final flush would fail again) and stop without a word.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return SIGPIPE_STATUS
    except ZsadError as exc:
        if debug:
            traceback.print_exception(exc.__cause__ or exc, file=sys.stderr)
        print(f"zsad-bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zsad-bench: interrupted", file=sys.stderr)
        return 130


def _one_line_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """``zsad-bench: warning: MESSAGE``, on one line, as errors are printed."""
    return f"zsad-bench: warning: {' '.join(str(message).split())}\n"


def _stdout_gone() -> bool:
    """Whether standard output is a pipe whose reader has gone (poll reports an error on its write end).

    False where that cannot be told (no ``select.poll``, a stdout without a file descriptor).
    """
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(main())
