"""The `cpu` LM head before and after #20's int8 products, in one run on one machine.

    .venv/bin/python bench/cpu_head.py BUNDLE --before DIR [--rounds 5] [--threads 1]

BUNDLE is a Gemma bundle built with the `cpu` flavor (so it has `int8_head`); DIR is a
checkout whose runner predates the int8 head (it ignores `int8_head` and widens the table,
e.g. `git worktree add DIR 80ec257`). Both run `runner gemma --backend cpu --lm-head cpu`
on the same 16-token prompt, 16 steps, `--ignore-eos`, in alternating fresh processes with
OMP/OpenBLAS and interpreter threads set to `--threads`; the medians of `ms_per_token`,
`prefill_ms` and `peak_rss_mib` are printed and written to bench/results/cpu-head-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "2," + ",".join(str(818 + 7 * k) for k in range(15))


def run(checkout: Path, bundle: Path, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    env.pop("PYTHONPATH", None)
    args = [sys.executable, "-m", "runner", "gemma", str(bundle), "--token-ids", PROMPT, "--steps", "16",
            "--ignore-eos", "--backend", "cpu", "--lm-head", "cpu", "--json", "--rounds", "2"]
    if (checkout / "runner" / "interpreter.py").read_text().count("def use_threads"):
        args += ["--threads", str(threads)]
    out = subprocess.run(args, cwd=checkout, env=env, capture_output=True, text=True, check=True).stdout
    r = json.loads(out)
    return {k: r[k] for k in ("ms_per_token", "prefill_ms", "peak_rss_mib", "tokens")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    sides = {"before": args.before.resolve(), "after": ROOT}
    runs: dict[str, list] = {side: [] for side in sides}
    for k in range(args.rounds):
        for side, checkout in sides.items():
            runs[side].append(run(checkout, args.bundle.resolve(), args.threads))
            print(f"round {k + 1} {side}: {runs[side][-1]['ms_per_token']:.1f} ms per token", flush=True)
    same_tokens = runs["before"][0]["tokens"] == runs["after"][0]["tokens"]
    summary = {side: {key: statistics.median(r[key] for r in rs) for key in ("ms_per_token", "prefill_ms", "peak_rss_mib")}
               for side, rs in runs.items()}
    result = {"date": datetime.date.today().isoformat(), "bundle": str(args.bundle), "threads": args.threads,
              "rounds": args.rounds, "load_average": os.getloadavg()[0], "same_tokens": same_tokens,
              "median": summary, "ratio_ms_per_token": summary["before"]["ms_per_token"] / summary["after"]["ms_per_token"],
              "runs": runs}
    out = ROOT / "bench" / "results" / f"cpu-head-{result['date']}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
