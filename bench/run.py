"""Every benchmark of issue #8 in one run: CLIP ViT-B/32 and Gemma-3 270M at their real
dimensions (bench/clip_vit_b32.py, bench/gemma_270m.py, each in its own process and
artifacts directory), gathered into bench/results/<date>.json, <date>.md and <date>.png.

    .venv/bin/python bench/run.py [--only clip|gemma]      (or: doit bench)

About 15 minutes on 2 cores, most of it cold builds and the runner's steady-state runs;
the generated checkpoints are made once and kept. Timings on a shared machine are noisy:
every ratio (start-up against start-up patching) is measured within one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.report import markdown, plot  # noqa: E402
from prepare.store import atomic_write  # noqa: E402

SCRIPTS = {"clip": "clip_vit_b32.py", "gemma": "gemma_270m.py"}
RESULTS = {"clip": "clip-vit-b32-{date}.json", "gemma": "gemma-270m-{date}.json"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=sorted(SCRIPTS), action="append", help="run only this model (repeatable)")
    args = ap.parse_args()
    date = datetime.date.today().isoformat()
    results_dir = ROOT / "bench" / "results"
    results = {}
    for model in args.only or list(SCRIPTS):
        # One BLAS thread: the runner and the build share 2 cores with whatever else runs, and
        # OpenBLAS threads spinning against each other made timings 5-10x worse.
        env = {**os.environ, "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")}
        path = results_dir / RESULTS[model].format(date=date)
        subprocess.run([sys.executable, str(ROOT / "bench" / SCRIPTS[model]), "--out", str(path)], check=True,
                       cwd=ROOT, env=env)
        results[model] = json.loads(path.read_text())
    out = results_dir / f"{date}.json"
    if args.only and out.exists():  # --only updates that model's part of today's results
        results = {**json.loads(out.read_text()), **results}
    atomic_write(out, json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    atomic_write(out.with_suffix(".md"), f"# Benchmarks, {date}\n\n" + text)
    plot(results, out.with_suffix(".png"))
    print(text)
    print(f"written: {out.relative_to(ROOT)}, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
