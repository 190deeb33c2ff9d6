"""The ``ctp`` command line: one subcommand per stage, each in ``ctp.commands``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ctp import __version__
from ctp.errors import CTPError
from ctp.logs import quiet_third_party

# Subcommand modules; each defines register(subparsers) and sets func=run on its parser.
COMMANDS = ("eval", "compress", "train_prompt", "generate", "zeroshot", "run", "export")


class Parser(argparse.ArgumentParser):
    """argparse with ctp's rule for mistakes: one line on stderr naming the problem and the fix, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ctp",
        description="Compress a causal LM (SparseGPT, GPTQ, baselines), learn a soft prompt that "
        "recovers its quality, and measure what came back.",
    )
    parser.add_argument("--version", action="version", version=f"ctp {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"ctp.commands.{name}").register(sub)
    return parser


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    quiet_third_party(logging.ERROR if verbose < 2 else logging.INFO)
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"
    elif not sys.stderr.isatty():
        # a log file, not a terminal: a progress line every 30 s instead of hundreds of updates a minute
        os.environ.setdefault("TQDM_MININTERVAL", "30")
    if quiet or verbose == 0:
        # transformers' own "Loading weights" bars: ctp shows its own progress for long work
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    command = "ctp"
    try:  # Ctrl-C at any point, start-up included, ends in one line
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help, --version, or a usage error already printed in one line
            return e.code if isinstance(e.code, int) else 2
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        command = f"ctp {args.command}"
        _setup_logging(args.verbose, args.quiet)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        return int(args.func(args) or 0)
    except CTPError as e:
        print(f"{command}: error: {_capped(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


def _capped(message: str, limit: int = 2000) -> str:
    """One line of at most ``limit`` characters: a message quoting a huge value stays readable."""
    line = " ".join(message.split())
    return line if len(line) <= limit else line[: limit - 20] + " ... (cut)"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
