"""Photo search (issue #17 part 2): `index` images per second on the demo and on a CLIP of
ViT-B/32's real dimensions, and the time of one `search`, on the `cpu` backend.

    .venv/bin/python bench/photo_search.py [--photos 48] [--sizes 4000x3000,640x480] [--threads 1]
        [--demo-bundle DIR] [--vit-bundle DIR]

Without bundle directories it builds them with doit in its own artifacts directory
(artifacts/bench-photo-search; under CORAL_ARTIFACTS when set): the demo takes a minute, the
ViT-B/32 a few (its checkpoint is generated once and kept). The photos are synthetic JPEGs
(smooth color fields, discs and grain; made once) in two sets: a phone's 12 megapixels,
where decoding is most of the work, and 640x480, where the model is. Everything runs as a
user runs it, `python -m runner ...` in a subprocess with OMP/OpenBLAS threads set
(`--threads`).

Measured per bundle and photo set: a cold `index` (every photo embedded: the runner's own
images/s over its embedding loop, decoding included, and the command's wall time); an
`index` again with nothing changed; the decoding alone (photos/s through
runner.images.load_image, one thread). On the large photos: `search` by two texts and by an
image (the command's wall time, Python start-up included, and the runner's setup, query and
scoring times). And scoring an index of 100,000 rows. The machine's load average is
recorded: on a shared machine every number is only as good as it.
Results go to bench/results/photo-search-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import use_artifacts  # noqa: E402

ARTIFACTS = use_artifacts("bench-photo-search")  # before prepare.store is imported: it fixes the artifacts directory
from prepare.store import atomic_write  # noqa: E402

VIT_VARS = ["recipe=recipes/clip-vit-b32.yaml", "generate=random-clip-vit-b32",
            "checkpoint=artifacts/checkpoint-vit-b32", "name=bench-photo-search-vit-b32"]
QUERIES = ["a photo of a red car", "two dogs in the snow"]  # words the demo's tokenizer knows


def env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
                MKL_NUM_THREADS=str(threads))


def build(variables: list[str], threads: int) -> None:
    subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), *variables], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, env=env(threads))


def timed_runner(threads: int, *args) -> tuple[dict, float]:
    """`python -m runner ARGS --json`: its output, and the command's wall seconds."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "runner", *map(str, args), "--json"], check=True, cwd=ROOT,
                         capture_output=True, text=True, env=env(threads))
    return json.loads(out.stdout), time.perf_counter() - t


def make_photos(directory: Path, n: int, size: tuple[int, int]) -> list[Path]:
    """n phone-sized JPEGs (made once): a smooth two-color field, a few discs, film grain."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(17)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        path = directory / f"{k // 16:02d}" / f"IMG_{k:04d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        w, h = size
        a, b = rng.integers(0, 256, (2, 3))
        t = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
        field = np.broadcast_to(a * (1 - t) + b * t, (h, w, 3))
        small = (rng.standard_normal((h // 8, w // 8, 1)) * 6).repeat(8, 0).repeat(8, 1)
        img = Image.fromarray(np.clip(field + small, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(5):
            x, y, r = rng.integers(0, w), rng.integers(0, h), rng.integers(h // 20, h // 4)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        img.save(tmp, "JPEG", quality=90)
        tmp.replace(path)
    return paths


def decode_rate(paths: list[Path], image_size: int) -> float:
    """Photos per second through the runner's image loading alone (this process, one thread)."""
    from runner.images import load_image
    t = time.perf_counter()
    for p in paths:
        load_image(p, image_size)
    return len(paths) / (time.perf_counter() - t)


def scoring_ms(rows: int, dims: int, repeats: int = 5) -> float:
    """Median ms to score a float16 index of `rows` x `dims` (memory-mapped from disk, as search does)."""
    from runner.photos.search import scores
    from runner.photos.store import Entry, Index, write_rows
    directory = ARTIFACTS / "scoring"
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data = rng.standard_normal((rows, dims)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    name = "embeddings-0000000000000000.npy"
    with open(directory / name, "wb") as f:
        write_rows(f, list(data.astype(np.float16)), None, dims, "float16")
    index = Index(directory, "-", "0" * 64, "-", dims, "float16", "cpu", ["cpu"], name,
                  [Entry(f"{i}.jpg", 0, 0) for i in range(rows)])
    query = data[0]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        s = scores(index, query)
        np.argpartition(-s, 4)[:5]
        times.append((time.perf_counter() - t) * 1e3)
    return float(sorted(times)[len(times) // 2])


def index_run(bundle: Path, photo_dir: Path, threads: int) -> tuple[Path, dict]:
    """A cold `index` of the directory, then one with nothing changed."""
    index = ARTIFACTS / "indexes" / f"{bundle.name}-{photo_dir.name}"
    shutil.rmtree(index, ignore_errors=True)
    cold, cold_s = timed_runner(threads, "index", bundle, photo_dir, "--out", index, "--backend", "cpu")
    again, again_s = timed_runner(threads, "index", bundle, photo_dir, "--out", index, "--backend", "cpu")
    return index, {"photos": cold["images"], "batch": cold["batch"], "images_per_s": cold["images_per_s"],
                   "wall_s": round(cold_s, 2), "setup_ms": cold["setup_ms"], "again_wall_s": round(again_s, 3),
                   "again_embedded": again["embedded"]}


def search_runs(index: Path, image: Path, threads: int) -> list[dict]:
    """Each query three times: the run of median wall time."""
    out = []
    for args in ([QUERIES[0]], [QUERIES[1]], ["--image", image]):
        runs = [timed_runner(threads, "search", index, *args, "--top", "5") for _ in range(3)]
        result, wall = sorted(runs, key=lambda r: r[1])[1]
        out.append({"query": "image" if args[0] == "--image" else "text", "input": str(args[-1]),
                    "wall_s": round(wall, 3), "setup_ms": result["setup_ms"], "query_ms": result["query_ms"],
                    "search_ms": result["search_ms"]})
    return out


def bench_bundle(bundle: Path, photo_sets: dict[str, list[Path]], threads: int) -> dict:
    from runner.bundle import read_manifest
    config = read_manifest(bundle).manifest["config"]
    image_size = config["vision_config"]["image_size"]
    result = {"bundle": str(bundle), "image_size": image_size, "dims": config["projection_dim"], "index": {}}
    for name, paths in photo_sets.items():
        index, result["index"][name] = index_run(bundle, paths[0].parent.parent, threads)
        result["index"][name]["decode_only_photos_per_s"] = round(decode_rate(paths, image_size), 2)
        if "search" not in result:  # on the first (largest) photos
            result["search"] = search_runs(index, paths[0], threads)
    result["scoring_ms_100k_rows"] = round(scoring_ms(100_000, result["dims"]), 2)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=int, default=48, help="synthetic photos per set (default 48)")
    ap.add_argument("--sizes", default="4000x3000,640x480",
                    help="photo sets by size, WxH,... (default 4000x3000,640x480: a phone's, and small)")
    ap.add_argument("--threads", type=int, default=1, help="OMP/OpenBLAS threads (default 1)")
    ap.add_argument("--demo-bundle", type=Path, help="the demo CLIP bundle (default: built here)")
    ap.add_argument("--vit-bundle", type=Path, help="a ViT-B/32-sized CLIP bundle (default: built here)")
    ap.add_argument("--out", type=Path, help="results file (default bench/results/photo-search-<date>.json)")
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # this process's own decode and scoring timings too
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    date = datetime.date.today().isoformat()
    bundles = {}
    if args.demo_bundle is None:
        print("photo-search: building the demo bundle ...", flush=True)
        build([], args.threads)
    bundles["demo"] = args.demo_bundle or ARTIFACTS / "bundles" / "demo-clip"
    if args.vit_bundle is None:
        print("photo-search: building the ViT-B/32 bundle (minutes) ...", flush=True)
        build(VIT_VARS, args.threads)
    bundles["vit-b32"] = args.vit_bundle or ARTIFACTS / "bundles" / "bench-photo-search-vit-b32"
    photo_sets = {}
    for w, h in sizes:
        print(f"photo-search: {args.photos} photos of {w}x{h} ...", flush=True)
        photo_dir = ARTIFACTS / f"photos-{w}x{h}"
        paths = make_photos(photo_dir, args.photos, (w, h))
        for extra in sorted(set(photo_dir.rglob("*.jpg")) - set(paths)):
            extra.unlink()  # a run with fewer --photos than the last
        photo_sets[f"{w}x{h}"] = paths
    result = {"date": date, "backend": "cpu", "threads": args.threads, "machine_cores": os.cpu_count(),
              "load_average_before": os.getloadavg()[0], "photos": args.photos,
              "photo_bytes_mean": {k: int(np.mean([p.stat().st_size for p in v])) for k, v in photo_sets.items()},
              "bundles": {}}
    for name, bundle in bundles.items():
        print(f"photo-search: {name} ...", flush=True)
        result["bundles"][name] = bench_bundle(bundle.resolve(), photo_sets, args.threads)
    result["load_average_after"] = os.getloadavg()[0]
    out = args.out or ROOT / "bench" / "results" / f"photo-search-{date}.json"
    atomic_write(out, json.dumps(result, indent=2) + "\n")
    for name, r in result["bundles"].items():
        for size, i in r["index"].items():
            print(f"{name}, {size} photos: index {i['images_per_s']:.2f} images/s (decode alone "
                  f"{i['decode_only_photos_per_s']:.1f}/s), again with nothing new {i['again_wall_s']:.2f} s")
        for q in r["search"]:
            print(f"{name}: search by {q['query']} {q['wall_s']:.2f} s (setup {q['setup_ms']:.0f} ms, query "
                  f"{q['query_ms']:.0f} ms, scoring {q['search_ms']:.1f} ms)")
        print(f"{name}: scoring 100,000 rows {r['scoring_ms_100k_rows']:.1f} ms")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
