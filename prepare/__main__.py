"""Command line of the build host: `python -m prepare COMMAND ...`."""

from __future__ import annotations

import argparse
import sys

from runner.flatbuf import FormatError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m prepare", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="show what a compiled or uncompiled Dense template holds")
    p.add_argument("file")
    p.add_argument("--uncompiled", help="the same layer before edgetpu_compiler: compare weights and multipliers")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            from .inspect import main as run
        return run(args)
    except (FormatError, ValueError, OSError) as e:
        # Bad input is the user's to fix: one line naming the file and the problem.
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
