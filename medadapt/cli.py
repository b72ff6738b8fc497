"""The ``medadapt`` console command.

Each subcommand lives beside the code it drives and registers itself through an
``add_parser(subparsers)`` function listed in ``_SUBCOMMANDS``; the function sets
``func`` on its parser to the callable that runs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module path of each subcommand's add_parser(); one line per subcommand.
_SUBCOMMANDS = [
    "medadapt.adapters.cli",
    "medadapt.data.cli",
    "medadapt.engine.cli",
    "medadapt.analysis.cli",
    "medadapt.monailabel.cli",
    "medadapt.protocol.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medadapt",
        description="Parameter-efficient adaptation of foundation models to medical images.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _SUBCOMMANDS:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as error:
        # Input errors are reported as one clear line, not a traceback.
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"medadapt {args.command}: error: {message}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
