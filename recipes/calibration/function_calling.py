"""Write the Function-Gemma recipe's calibration and held-out conversations.

    python recipes/calibration/function_calling.py

- function-calling.jsonl: 48 conversations {"tools", "messages"} for calibration: one to six
  tools declared (prompts of several hundred tokens, as real tool declarations make them),
  often after earlier exchanges with tool responses;
- function-calling-verify.jsonl: 48 held-out conversations {"tools", "messages", "expected"}
  for `doit verify`: phrasings and values none of the calibration ones use.

Both come from the demo Function-Gemma's generator (recipes/demo-gemma/conversations.py,
seeds other than the demo's own), so the same command writes the same files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "demo-gemma"))

from conversations import Generator, expected_calls  # noqa: E402

ROWS = 48


def write(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def main() -> int:
    gen = Generator(seed=10)
    calibration = [gen.conversation() for _ in range(ROWS)]
    write(HERE / "function-calling.jsonl", [{"tools": c["tools"], "messages": c["messages"]} for c in calibration])
    gen = Generator(seed=11, heldout=True)
    held_out = [gen.conversation() for _ in range(ROWS)]
    write(HERE / "function-calling-verify.jsonl", [{"tools": c["tools"], "messages": c["messages"],
                                                   "expected": expected_calls(c["answer"])} for c in held_out])
    return 0


if __name__ == "__main__":
    sys.exit(main())
