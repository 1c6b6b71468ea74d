"""Long Gemma prompts: the runner's peak memory, prefill time and ms per token against the
prompt's length, on a Gemma-3 of 270M's real dimensions (18 layers, 15 of them sliding with
a window of 512; seeded random weights, `generate=random-gemma-270m`).

    .venv/bin/python bench/long_prompts.py [--lengths 128,512,1024,2048,4096] [--steps 16]
        [--threads 1] [--before DIR] [--after DIR]

It builds the bundle once into <artifacts>/bench-long-prompts (emulate parameters only: the
emulate backend takes any number of rows per call, so a long prefill is one call per layer
and chunk, not one per row). Then, per prompt length, a fresh process loads it as `runner
gemma` does (`runner.load.load`, emulate backend, cpu head) and generates with
`runner.generate.generate` from random prompt ids, ignoring end-of-sequence: two rounds, the
second one measured (the first also decodes each layer's parameters). For the prefill and
for each decode step it records wall time and the process's CPU time, and the LM head's CPU
time apart (the decoder's is the rest: where the attention's cost shows); ms per token is
the median over the decode steps. CPU time is the column to compare on a shared machine: with
one BLAS thread it is the work done, whatever else the machine runs (the load average
before each run is recorded too). Peak RSS is the process's own (VmHWM), and includes about
650 MiB that the emulate backend always holds (each layer decoded to float32).

`--before DIR` runs the same in DIR's runner (e.g. a copy of runner/ at the commit before a
change: `git archive COMMIT runner | tar -x -C DIR`), alternating with `--after DIR` (default
this checkout), so both columns come from one run on one machine. BLAS and OpenMP threads
are set to `--threads`. Results go to bench/results/long-prompts-<date>.json, and the table
is printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import ROOT, doit, use_artifacts  # noqa: E402

ARTIFACTS = use_artifacts("bench-long-prompts")
NAME = "bench-long-prompts"
# The random checkpoint has no chat template for the recipe's conversations: its own prompts instead.
VARS = ["recipe=recipes/functiongemma-270m.yaml", "checkpoint=artifacts/checkpoint", "generate=random-gemma-270m",
        f"name={NAME}", "flavors=[]", "calibration={prompts: prompts.txt, synthetic: 16}"]
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")

# Run with the checkout as the current directory, so `runner` is that checkout's.
# argv: bundle, prompt length, steps. Prints one JSON object.
MEASURE = """
import json, sys, time
from pathlib import Path
import numpy as np
from runner.generate import Sampler, generate
from runner.load import load

bundle, length, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
prompt = [2] + np.random.default_rng(length).integers(4, 262144, length - 1).tolist()
loaded = load(bundle, "emulate", lm_head="cpu")


class TimedHead:  # the head's own CPU time, so the decoder's is the step's minus it
    def __init__(self, head):
        self.head, self.stats, self.cpu = head, head.stats, []

    def __call__(self, h, margin=None):
        c = time.process_time()
        out = self.head(h, margin=margin)
        self.cpu.append((time.process_time() - c) * 1e3)
        return out


for _ in range(2):  # the first round also decodes every layer's parameters
    wall, cpu, head = [], [], TimedHead(loaded.head)
    tokens = generate(loaded.model, head, prompt, steps, Sampler())
    while True:
        w, c = time.perf_counter(), time.process_time()
        if next(tokens, None) is None:
            break
        wall.append((time.perf_counter() - w) * 1e3)
        cpu.append((time.process_time() - c) * 1e3)
rss = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
           if line.startswith("VmHWM:"))
decoder = [step - h for step, h in zip(cpu, head.cpu)]
print(json.dumps({"prefill_ms": wall[0], "prefill_cpu_ms": cpu[0], "ms_per_token": float(np.median(wall[1:])),
                  "cpu_ms_per_token": float(np.median(cpu[1:])),
                  "decoder_cpu_ms_per_token": float(np.median(decoder[1:])), "peak_rss_mib": rss / 1024}))
"""


def measure(checkout: Path, bundle: Path, length: int, steps: int, threads: int) -> dict:
    """One fresh process of `checkout`'s runner on a prompt of `length` random ids."""
    load = round(os.getloadavg()[0], 2)
    env = dict(os.environ, **{v: str(threads) for v in THREAD_VARIABLES})
    env.pop("PYTHONPATH", None)
    run = subprocess.run([sys.executable, "-c", MEASURE, str(bundle), str(length), str(steps)], cwd=checkout,
                         env=env, capture_output=True, text=True)
    if run.returncode != 0:
        return {"error": (run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])[-1],
                "load_before": load}
    return {k: round(v, 1) for k, v in json.loads(run.stdout).items()} | {"load_before": load}


def table(result: dict) -> str:
    columns = (("peak RSS MiB", "peak_rss_mib", 1), ("prefill CPU s", "prefill_cpu_ms", 1e-3),
               ("CPU ms per token", "cpu_ms_per_token", 1), ("decoder CPU ms per token", "decoder_cpu_ms_per_token", 1),
               ("wall ms per token", "ms_per_token", 1))
    checkouts = list(result["runs"])
    lines = ["| prompt tokens | " + " | ".join(f"{c}: {title}" for title, _, _ in columns for c in checkouts) + " |",
             "|" + " --- |" * (1 + len(columns) * len(checkouts))]
    for i, length in enumerate(result["lengths"]):
        cells = []
        for _, key, scale in columns:
            for c in checkouts:
                r = result["runs"][c][i]
                cells.append(r["error"] if "error" in r else f"{r[key] * scale:.{2 if scale != 1 else 0}f}")
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="128,512,1024,2048,4096", help="prompt lengths, comma-separated")
    parser.add_argument("--steps", type=int, default=32, help="tokens generated per round")
    parser.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads")
    parser.add_argument("--before", type=Path, help="another checkout whose runner runs the same prompts")
    parser.add_argument("--after", type=Path, default=ROOT,
                        help="the checkout measured as `after` (default: this one; a copy lets you edit meanwhile)")
    parser.add_argument("--out", type=Path, help="default bench/results/long-prompts-<date>.json")
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    print(f"building {NAME} in {ARTIFACTS} ...", flush=True)
    build_s = doit(VARS)
    bundle = ARTIFACTS / "bundles" / NAME
    checkouts = {"before": args.before.resolve()} if args.before else {}
    checkouts["after"] = args.after.resolve()
    runs: dict[str, list] = {label: [] for label in checkouts}
    for length in lengths:
        for label, checkout in checkouts.items():
            print(f"{label}: {length} tokens ...", flush=True)
            runs[label].append(measure(checkout, bundle, length, args.steps, args.threads))
    commits = {label: subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=c, capture_output=True,
                                     text=True).stdout.strip() or str(c) for label, c in checkouts.items()}
    result = {"date": datetime.date.today().isoformat(), "model": "random-gemma-270m (18 layers, window 512)",
              "backend": "emulate", "lm_head": "cpu", "steps": args.steps, "threads": args.threads,
              "build_s": round(build_s, 1), "checkouts": commits, "lengths": lengths, "runs": runs}
    out = args.out or ROOT / "bench" / "results" / f"long-prompts-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
