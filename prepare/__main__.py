"""Command line of the build host: `python -m prepare COMMAND ...`."""

from __future__ import annotations

import argparse
import sys

from runner.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m prepare", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="show what a compiled or uncompiled Dense template holds")
    p.add_argument("file")
    p.add_argument("--uncompiled", help="the same layer before edgetpu_compiler: compare weights and multipliers")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")

    p = sub.add_parser("check-templates", help="self-check a directory of (X.tflite, X_edgetpu.tflite) pairs")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true", help="a JSON list, one object per pair or lone file")
    return parser


def check_templates(args) -> int:
    import json

    from .templates import check_pair, find_pairs
    pairs, alone = find_pairs(args.dir)
    rows = []
    for pair in pairs:
        check_pair(pair)
        s = pair.shape
        rows.append({"uncompiled": str(pair.uncompiled), "compiled": str(pair.compiled),
                     "in": s.n_in if s else None, "out": s.n_out if s else None,
                     "batch": s.batch if s else None, "ok": pair.ok, **({"reason": pair.reason} if not pair.ok else {})})
    rows += [{"file": str(p), "ok": None, "reason": "no partner (X.tflite needs X_edgetpu.tflite)"} for p in alone]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            if "file" in r:
                print(f"LONE  {r['file']}: {r['reason']}")
            else:
                print(f"{'OK  ' if r['ok'] else 'FAIL'}  in {r['in']} out {r['out']} batch {r['batch']}  "
                      f"{r['compiled']}" + ("" if r["ok"] else f": {r['reason']}"))
        if not rows:
            print(f"{args.dir}: no .tflite files")
    return 0 if all(r["ok"] for r in rows if "file" not in r) else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            from .inspect import main as run
            return run(args)
        return check_templates(args)
    except (UserError, OSError) as e:
        # Bad input is the user's to fix: one line naming the file and the problem.
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
