"""The ``ubsmoe`` command line: list methods, run an experiment, run benchmarks (the entry point; the parser
is in ``cli_parser``, what each subcommand does in ``cli_commands``)."""

from __future__ import annotations

import logging
import sys

from ubsmoe.cli_parser import build_parser
from ubsmoe.config import ConfigError
from ubsmoe.engine.errors import FederationStopped, RunInterrupted


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # key=value settings after the options land here (argparse fills nargs="*" at the first positional)
            if hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
                args.overrides = list(args.overrides or []) + extra
            else:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as done:  # --help (0) or a bad option (2, one line already printed)
        return done.code if isinstance(done.code, int) else 2
    try:
        return args.func(args)
    except ConfigError as error:  # user errors only: a bug keeps its traceback
        print(f"ubsmoe: error: {error}", file=sys.stderr)
        return 2
    except FederationStopped as error:  # not a bug either: the clients did not answer
        out = getattr(args, "resume", None) or getattr(args, "out", None) or "runs/latest"
        resume = f"; `ubsmoe run --resume {out}` continues from its last checkpoint" if args.command == "run" else ""
        print(f"ubsmoe: the run stopped: {error}{resume}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:  # Ctrl-C: one line saying what is kept, and the shell's code 130
        print(f"\nubsmoe: {interrupted(args, interrupt)}", file=sys.stderr)
        return 130


def interrupted(args, interrupt: KeyboardInterrupt) -> str:
    """What an interrupted command leaves, and how to go on."""
    if isinstance(interrupt, RunInterrupted):
        out = getattr(args, "resume", None) or getattr(args, "out", None) or "runs/latest"
        if interrupt.checkpoint_round == 0 or out is None:
            return f"interrupted in round {interrupt.round_index}, before any checkpoint: start the run again"
        return (f"interrupted in round {interrupt.round_index}; the last checkpoint is round "
                f"{interrupt.checkpoint_round}: resume with `ubsmoe run --resume {out}`")
    if args.command == "compare":
        return "interrupted: finished runs are kept; the same `ubsmoe compare` command resumes the rest"
    return "interrupted"


if __name__ == "__main__":
    sys.exit(main())
