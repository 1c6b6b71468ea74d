"""`runner check` and `runner selftest`: is this bundle whole, what can this machine run it
on, and does the Edge TPU compute what the emulation says.

check: the manifest's schema and version, every path inside the bundle (no absolute path,
no `..`, no symlink leading out), every file present with its size and (unless --quick) its
sha256, and which backends work here.

selftest (for users with a Coral): for each distinct template, two patched layers A and B
run A, B, A on the device, each compared with `emulate` of the same artifact. A stale
parameter cache (a shared caching token) shows as the second A giving B's answers; a
different requantization shows as steps of difference. Exit 0 when all agree within one
step, 1 on a mismatch, 2 when there is no device or library.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from .bundle import Bundle, BundleError, read_manifest, sha256_file, size_problem
from .executors import BackendError, LazyDense, TemplateInterpreter, edgetpu_delegates, edgetpu_library
from .interpreter import INTERPRETER


def edgetpu_devices() -> list[str]:
    """Edge TPUs this machine shows: PCIe (/dev/apex_*) and USB (Global Unichip 1a6e:089a
    before its first use, Google 18d1:9302 after)."""
    found = [str(p) for p in sorted(Path("/dev").glob("apex_*"))]
    for dev in sorted(Path("/sys/bus/usb/devices").glob("*")):
        try:
            ids = ((dev / "idVendor").read_text().strip(), (dev / "idProduct").read_text().strip())
        except OSError:
            continue
        if ids in (("1a6e", "089a"), ("18d1", "9302")):
            found.append(f"usb {dev.name} {ids[0]}:{ids[1]}")
    return found


def machine() -> dict:
    """What this machine has for running bundles."""
    has_safetensors = importlib.util.find_spec("safetensors") is not None
    return {"numpy": np.__version__, "interpreter": INTERPRETER, "safetensors": has_safetensors,
            "libedgetpu": edgetpu_library(), "edgetpu_devices": edgetpu_devices()}


def check_bundle(directory: str | Path, quick: bool = False) -> dict:
    """{"ok", "problems", "backends", "machine", "files"}: every problem found, not just the first."""
    problems, files = [], 0
    flavors: set[str] = set()
    try:
        m = read_manifest(directory)
    except BundleError as e:
        m = None
        problems.append(str(e))
    if m is not None:
        for what, f in m.files():
            files += 1
            problem = size_problem(f, what)
            if problem is None and not quick and sha256_file(f.path) != f.sha256:
                problem = f"{f.path}: sha256 differs from {Path(directory) / 'manifest.json'} ({what})"
            if problem:
                problems.append(problem)
        if not problems:
            try:
                Bundle.open(directory)  # the host tensors' header too
            except BundleError as e:
                problems.append(str(e))
        tpu = m.tpu_layers
        flavors = set.intersection(*(set(layer.files) for layer in tpu)) if tpu else {"params", "cpu", "edgetpu"}
    have = machine()
    ok = not problems
    backends = {
        "emulate": ok and "params" in flavors,
        "cpu": ok and "cpu" in flavors and have["interpreter"] is not None,
        "edgetpu": ok and "edgetpu" in flavors and have["interpreter"] is not None
                   and have["libedgetpu"] is not None and bool(have["edgetpu_devices"]),
        "fp32": have["safetensors"],  # with the checkpoint, given by --checkpoint
    }
    return {"ok": ok, "problems": problems, "backends": backends, "machine": have, "files": files,
            "checked": "sizes" if quick else "sha256"}


def selftest(directory: str | Path, rows: int = 16, seed: int = 0) -> tuple[int, list[str]]:
    """(exit status, report lines); see the module docstring."""

    bundle = Bundle.open(directory)
    try:
        delegates = edgetpu_delegates()
    except BackendError as e:
        return 2, [f"no Edge TPU to test here: {e}"]
    by_template: dict[tuple, list] = {}
    for layer in bundle.tpu_layers:
        if "edgetpu" in layer.files:
            by_template.setdefault((layer.n_in, layer.n_out, layer.batch), []).append(layer)
    if not by_template:
        return 2, [f"{bundle.dir}: no edgetpu artifacts to test (built without a compiled template)"]
    rng = np.random.default_rng(seed)
    status, lines = 0, []
    for (n_in, n_out, batch), layers in sorted(by_template.items()):
        a, b = layers[0], layers[1] if len(layers) > 1 else layers[0]
        x = rng.integers(0, 256, (rows, n_in), dtype=np.uint8)
        device = {layer.name: TemplateInterpreter(layer.files["edgetpu"].path, layer, delegates) for layer in (a, b)}
        worst = 0
        for layer in (a, b, a):  # A, B, then A again: its parameters must be A's, not B's
            expected = LazyDense(layer.files["params"].path, layer, "emulate")(x).astype(int)
            worst = max(worst, int(np.abs(device[layer.name](x).astype(int) - expected).max()))
        verdict = "agrees" if worst <= 1 else "MISMATCH"
        status = status if worst <= 1 else 1
        lines.append(f"{n_in}x{n_out}b{batch}: {a.name} / {b.name}: max difference {worst} step(s): {verdict}")
    return status, lines
