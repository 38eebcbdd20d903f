"""The ``onnxpress`` command line: one module per subcommand, each with ``add_parser`` and ``run``.

Exit status: 0 ok, 2 usage or input error, 3 a pass failed, 4 validation failed. Errors that
onnxpress raises on purpose print one line; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from onnxpress import __version__
from onnxpress.errors import EXIT_USAGE, OnnxpressError

#: Subcommand modules under onnxpress.cli, in the order ``--help`` lists them.
COMMANDS: tuple[str, ...] = ("convert_cmd", "inspect_cmd", "passes_cmd", "compress_cmd", "run_cmd", "validate_cmd", "pack_cmd", "unpack_cmd", "sensitivity_cmd")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser with every subcommand.

    Args:
        command: Build only this subcommand in full (none when it names no subcommand): the
            others get bare parsers, so their modules (and what they import: onnx-ir alone
            takes 0.6 s) are not loaded.
    """
    parser = argparse.ArgumentParser(
        prog="onnxpress",
        description="Shrink trained models for batch inference, and prove they still work.",
    )
    parser.add_argument("--version", action="version", version=f"onnxpress {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        if command is not None and name != f"{command}_cmd":
            subparsers.add_parser(name.removesuffix("_cmd"))
            continue
        module = importlib.import_module(f"onnxpress.cli.{name}")
        sub = module.add_parser(subparsers)
        sub.set_defaults(handler=module.run)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names (its first word that is not an option), if it is one.

    None when the top-level help is asked for before it (that help lists every command).
    """
    for arg in argv:
        if arg in ("-h", "--help"):
            return None
        if not arg.startswith("-"):
            return arg if f"{arg}_cmd" in COMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI and returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_in(argv)
    if command is None and "--version" in argv and not {"-h", "--help"} & set(argv):
        command = ""  # every subcommand bare: the version needs none of them
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except OnnxpressError as exc:
        print(f"onnxpress {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"onnxpress {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
