"""Time template generation per shape, with TensorFlow's import counted apart.

    .venv/bin/python bench/template_generation.py [--json]

Shapes are those of CLIP ViT-B/32 and Gemma-3 270M at the batch sizes a recipe
would use. Each shape is generated in this one process, so only the first pays
the import; the import is measured once and reported on its own line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prepare.dense_templates import (  # noqa: E402
    Shape,
    _import_tensorflow,
    make_uncompiled,
    quiet_output,
)

SHAPES = [Shape(256, 256, 1), Shape(768, 768, 4), Shape(768, 3072, 4), Shape(3072, 768, 4),
          Shape(512, 2048, 4), Shape(640, 2048, 1), Shape(2048, 640, 1), Shape(640, 8192, 1)]


def main() -> None:
    t = time.perf_counter()
    with quiet_output():
        _import_tensorflow()
    rows = [{"shape": "import tensorflow", "seconds": time.perf_counter() - t}]
    for shape in SHAPES:
        t = time.perf_counter()
        data, _ = make_uncompiled(shape)
        rows.append({"shape": str(shape), "seconds": time.perf_counter() - t, "bytes": len(data)})
    if "--json" in sys.argv:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'shape':<20} {'seconds':>8} {'bytes':>10}")
    for r in rows:
        print(f"{r['shape']:<20} {r['seconds']:>8.2f} {r.get('bytes', ''):>10}")


if __name__ == "__main__":
    main()
