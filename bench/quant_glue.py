"""The host's glue around one int8 linear (quantize rows, dequantize, bias), before and after.

    .venv/bin/python bench/quant_glue.py [--before DIR]

Times `runner.quant.QuantizedLinear` with a Dense backend that returns a fixed uint8 output
(so only the glue is timed) at Gemma-270M and CLIP ViT-B/32 shapes, one row (a decode step)
and many (a prefill, an image batch). With `--before DIR` (a checkout, e.g. a git worktree
of an older commit) the same runs on DIR's runner in a subprocess, so both columns come
from one run. Set OMP_NUM_THREADS / OPENBLAS_NUM_THREADS to the same value for both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(1, 640, 2048), (1, 2048, 640), (256, 640, 2048), (50, 768, 3072)]

MEASURE = """
import json, sys, time
import numpy as np
from runner.quant import QuantizedLinear
rng = np.random.default_rng(0)
out = {}
for rows, n_in, n_out in json.loads(sys.argv[1]):
    y8 = rng.integers(0, 256, (rows, n_out), dtype=np.uint8)
    q = QuantizedLinear(lambda x: y8, rng.uniform(0.01, 0.02, n_out).astype(np.float32),
                        rng.uniform(0.5, 1, n_out).astype(np.float32), rng.standard_normal(n_out).astype(np.float32),
                        127, 128)
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    q(x)
    n = 2000 if rows == 1 else 200
    t = time.perf_counter()
    for _ in range(n):
        q(x)
    out[f"{rows}x{n_in}->{n_out}"] = round((time.perf_counter() - t) / n * 1e6, 1)
print(json.dumps(out))
"""


def measure(checkout: Path) -> dict:
    run = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(SHAPES)], cwd=checkout, capture_output=True,
                         text=True, check=True)
    return json.loads(run.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path)
    args = parser.parse_args()
    sides = ({"before": args.before.resolve()} if args.before else {}) | {"after": ROOT}
    results = {side: measure(checkout) for side, checkout in sides.items()}
    print("| rows x in -> out | " + " | ".join(f"{side} (us per call)" for side in results) + " |")
    print("|" + " --- |" * (1 + len(results)))
    for shape in results["after"]:
        print(f"| {shape} | " + " | ".join(str(r[shape]) for r in results.values()) + " |")


if __name__ == "__main__":
    main()
