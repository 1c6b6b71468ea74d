"""Command line of the build host: `python -m prepare COMMAND ...`.

    inspect FILE... [--uncompiled FILE] [--json]  what compiled or uncompiled models hold (which share a caching token)
    check-templates DIR [--json]                  self-check a directory of (X.tflite, X_edgetpu.tflite) pairs
                                                  (--json: {"command", "dir", "ok", "pairs", "lone_files"})

Bad input is one line naming the file and the problem, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from runner.errors import UserError

from .dense_templates import check_pair, find_pairs
from .inspection import inspect_main


def check_templates(args) -> int:
    pairs, alone = find_pairs(args.dir)
    rows = []
    for pair in pairs:
        check_pair(pair)
        s = pair.shape
        rows.append({"uncompiled": str(pair.uncompiled), "compiled": str(pair.compiled),
                     "in": s.n_in if s else None, "out": s.n_out if s else None, "batch": s.batch if s else None,
                     "ok": pair.ok, **({"reason": pair.reason} if not pair.ok else {}),
                     **({"warnings": pair.warnings} if pair.warnings else {})})
    rows += [{"file": str(p), "ok": None, "reason": "no partner (X.tflite needs X_edgetpu.tflite)"} for p in alone]
    ok = all(r["ok"] for r in rows if "file" not in r)
    if args.json:  # one object, as inspect --json gives
        print(json.dumps({"command": "check-templates", "dir": str(args.dir), "ok": ok,
                          "pairs": [r for r in rows if "file" not in r],
                          "lone_files": [r for r in rows if "file" in r]}, indent=2))
    else:
        for r in rows:
            if "file" in r:
                print(f"LONE  {r['file']}: {r['reason']}")
            else:
                print(f"{'OK  ' if r['ok'] else 'FAIL'}  in {r['in']} out {r['out']} batch {r['batch']}  "
                      f"{r['compiled']}" + ("" if r["ok"] else f": {r['reason']}"))
                for line in r.get("warnings", []):
                    print(f"      warning: {line}")
        if not rows:
            print(f"{args.dir}: no .tflite files")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m prepare", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="show what compiled or uncompiled models hold, and which were compiled "
                                       "together (share a caching token)")
    p.add_argument("file", nargs="+")
    p.add_argument("--uncompiled", help="a Dense template before edgetpu_compiler (with one compiled FILE): "
                                        "compare weights and multipliers")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=inspect_main)

    p = sub.add_parser("check-templates", help="self-check a directory of (X.tflite, X_edgetpu.tflite) pairs")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true",
                   help="one JSON object: dir, ok, pairs (one object each), lone_files")
    p.set_defaults(func=check_templates)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "inspect" and args.uncompiled and len(args.file) > 1:
        parser.error("--uncompiled compares one compiled FILE with its template: give one FILE")
    try:
        return args.func(args)
    except (UserError, OSError) as e:
        # Bad input is the user's to fix: one line naming the file and the problem.
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
