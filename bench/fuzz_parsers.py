"""Long mutation run over the template parsers, outside the test suite.

    .venv/bin/python bench/fuzz_parsers.py [SEED] [CASES]

Mutates the real fixture files (a few bytes, mostly in the structural first 1200
bytes, sometimes a truncation) and feeds them to `inspect` (compiled, compared
with the uncompiled model) and to the uncompiled-template reader. Anything but
the documented FormatError is counted and the first few are printed.
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prepare.inspect import inspect  # noqa: E402
from prepare.templates import describe  # noqa: E402
from runner.flatbuf import FormatError  # noqa: E402
from runner.tflite_file import parse_tflite  # noqa: E402

FIXTURES = ROOT.parent / "shared" / "fixtures" / "edgetpu"


def main(seed: int = 1, cases: int = 20000) -> int:
    compiled = (FIXTURES / "dense_256_edgetpu.tflite").read_bytes()
    uncompiled_path = FIXTURES / "dense_256.tflite"
    rng = np.random.default_rng(seed)
    undocumented, worst, started = 0, 0.0, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mutant.tflite"
        for k in range(cases):
            data = bytearray(compiled if k % 2 == 0 else uncompiled_path.read_bytes())
            for _ in range(rng.integers(1, 4)):
                pos = rng.integers(min(len(data), 1200)) if rng.random() < 0.7 else rng.integers(len(data))
                data[pos] = rng.integers(256)
            if rng.random() < 0.1:
                data = data[: rng.integers(len(data))]
            path.write_bytes(data)
            t = time.perf_counter()
            try:
                if k % 2 == 0:
                    inspect(path, uncompiled_path)
                else:
                    inspect(path)
                    describe(parse_tflite(bytes(data), path))
            except FormatError:
                pass
            except Exception:  # noqa: BLE001 - counting what is not documented is the point
                undocumented += 1
                if undocumented <= 5:
                    traceback.print_exc()
            worst = max(worst, time.perf_counter() - t)
    print(f"{cases} cases, {undocumented} undocumented errors, worst case {worst * 1e3:.1f} ms, "
          f"total {time.perf_counter() - started:.1f} s")
    return 1 if undocumented else 0


if __name__ == "__main__":
    sys.exit(main(*(int(a) for a in sys.argv[1:3])))
