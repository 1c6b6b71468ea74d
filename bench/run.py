"""Every benchmark in one run: CLIP ViT-B/32, SigLIP base/16 and Gemma-3 270M at their real
dimensions (bench/clip_vit_b32.py, with --model siglip, bench/gemma_270m.py, each in its
own process and artifacts directory), then the CPU runtimes a user compares with on the
same checkpoints and bundles (bench/peers_clip.py, CLIP and SigLIP: ONNX Runtime fp32 and
int8; bench/peers_gemma.py: llama.cpp Q8_0), then `runner serve` under load beside llama-cpp-python's server (bench/serve.py,
under `serve`), gathered into bench/results/<date>.json, <date>.md and <date>.png.

    .venv/bin/python bench/run.py [--only clip|siglip|gemma|serve] [--no-peers] [--no-serve]   (or: doit bench)

About 15 minutes on 2 cores for the models, most of it cold builds and the runner's
steady-state runs, and a few more for the peers (their first run also exports ONNX files
and converts a GGUF); the generated checkpoints are made once and kept. The peers are the
`bench` extra (`pip install -e '.[test,bench]'`); a missing one is skipped with a line
saying so. Timings on a shared machine are noisy: every ratio (start-up against start-up
patching, runner against peer) is measured within one run, the peers' interleaved with
the same thread count on every side (PEER_THREADS).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.report import markdown, peers_markdown, plot  # noqa: E402
from prepare.store import atomic_write  # noqa: E402

SCRIPTS = {"clip": ["clip_vit_b32.py"], "siglip": ["clip_vit_b32.py", "--model", "siglip"],
           "gemma": ["gemma_270m.py"]}
RESULTS = {"clip": "clip-vit-b32-{date}.json", "siglip": "siglip-base-{date}.json", "gemma": "gemma-270m-{date}.json"}
# model -> (peer script, the module it needs, what it is, the model bench's artifacts and bundle name)
PEERS = {"clip": ("peers_clip.py", "onnxruntime", "ONNX Runtime", "bench-clip-vit-b32"),
         "siglip": ("peers_clip.py", "onnxruntime", "ONNX Runtime", "bench-siglip-base"),
         "gemma": ("peers_gemma.py", "llama_cpp", "llama.cpp (llama-cpp-python)", "bench-gemma-270m")}
PEER_THREADS = 1  # as the model benches' BLAS: one thread a side, so two processes never fight for 2 cores


def run_peers(model: str, date: str, env: dict) -> dict | None:
    """The peer script's results for `model` (on the bench's checkpoint and bundle), or None
    with a line saying why when its runtime is not installed."""
    script, module, what, name = PEERS[model]
    if importlib.util.find_spec(module) is None:
        print(f"peers: {what} is not installed, skipping it for {model} (pip install -e '.[test,bench]')")
        return None
    artifacts = Path(os.environ.get("CORAL_ARTIFACTS", ROOT / "artifacts")) / name
    subprocess.run([sys.executable, str(ROOT / "bench" / script), str(artifacts / "checkpoint"),
                    str(artifacts / "bundles" / name), "--threads", str(PEER_THREADS)], check=True, cwd=ROOT, env=env)
    return json.loads((ROOT / "bench" / "results" / f"peers-{model}-{date}.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=[*sorted(SCRIPTS), "serve"], action="append",
                    help="run only this model, or only the server bench (repeatable)")
    ap.add_argument("--no-peers", action="store_true", help="skip ONNX Runtime and llama.cpp")
    ap.add_argument("--no-serve", action="store_true", help="skip bench/serve.py (`runner serve` under load)")
    args = ap.parse_args()
    date = datetime.date.today().isoformat()
    results_dir = ROOT / "bench" / "results"
    results, peers = {}, {}
    # One BLAS thread: the runner and the build share 2 cores with whatever else runs, and
    # OpenBLAS threads spinning against each other made timings 5-10x worse.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "1")}
    for model in [m for m in args.only or list(SCRIPTS) if m != "serve"]:
        path = results_dir / RESULTS[model].format(date=date)
        script, *options = SCRIPTS[model]
        subprocess.run([sys.executable, str(ROOT / "bench" / script), *options, "--out", str(path)], check=True,
                       cwd=ROOT, env=env)
        results[model] = json.loads(path.read_text())
        peer = None if args.no_peers else run_peers(model, date, env)
        if peer:
            peers[model] = peer["peers"][model]
    serve = None
    if not args.no_serve and (not args.only or "serve" in args.only):
        # `runner serve` batching on and off, and llama-cpp-python's server (skipped, saying
        # why, when it is not installed), at the peers' thread count
        command = [sys.executable, str(ROOT / "bench" / "serve.py"), "--threads", str(PEER_THREADS)]
        subprocess.run(command + (["--no-llama"] if args.no_peers else []), check=True, cwd=ROOT, env=env)
        serve = json.loads((results_dir / f"serve-{date}.json").read_text())
    from bench.serve import markdown as serve_markdown  # it sets this process's thread variables: only now
    out = results_dir / f"{date}.json"
    if args.only and out.exists():  # --only updates that model's part of today's results
        before = json.loads(out.read_text())
        peers = {**before.pop("peers", {}), **peers}
        serve = serve or before.pop("serve", None)
        before.pop("serve", None)
        results = {**before, **results}
    atomic_write(out, json.dumps({**results, "peers": peers} | ({"serve": serve} if serve else {}), indent=2) + "\n")
    text = (markdown(results) if results else "") + peers_markdown(peers) + ("\n" + serve_markdown(serve) if serve else "")
    atomic_write(out.with_suffix(".md"), f"# Benchmarks, {date}\n\n" + text)
    if results:
        plot(results, out.with_suffix(".png"))
    print(text)
    print(f"written: {out.relative_to(ROOT)}, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
