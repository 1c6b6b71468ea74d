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

import os
from collections import Counter
from pathlib import Path

import numpy as np

from .bundle import MANIFEST, Bundle, BundleError, read_manifest, sha256_file, size_problem
from .executors import BackendError, LazyDense, TemplateInterpreter, edgetpu_delegates, edgetpu_library
from .interpreter import INTERPRETER, INTERPRETER_PURPOSE
from .lm_head import open_int8_tiles
from .packages import PIP_NAMES, MissingPackageError, available, missing


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


# The packages of runner/requirements.txt besides numpy and the interpreter: module -> what needs it.
PACKAGES = {"safetensors": "it reads host.safetensors: every command needs it", "PIL": "it reads images",
            "tokenizers": "it turns text into token ids"}


def machine() -> dict:
    """What this machine has for running bundles; `missing`: a line per package it lacks,
    saying what needs it and how to install it."""
    have = {module: available(module) for module in PACKAGES}
    return {"numpy": np.__version__, "interpreter": INTERPRETER,
            "packages": {PIP_NAMES.get(m, m): present for m, present in have.items()},
            "missing": [str(missing(m, purpose)) for m, purpose in PACKAGES.items() if not have[m]]
                       + ([] if INTERPRETER else [str(missing("ai_edge_litert", INTERPRETER_PURPOSE))]),
            "libedgetpu": edgetpu_library(), "edgetpu_devices": edgetpu_devices()}


def check_bundle(directory: str | Path, quick: bool = False) -> dict:
    """{"ok", "problems", "backends", "machine", "files"}: every problem found, not just the first.
    A file that cannot be read is a problem naming it; a package this Python lacks is in
    `machine.missing`, and without safetensors the bundle cannot be opened here (not `ok`).
    A directory without a manifest is no bundle to report on: BundleError, one line."""
    problems, files = [], 0
    flavors: set[str] = set()
    try:
        m = read_manifest(directory)
    except BundleError as e:
        if not os.path.lexists(Path(directory) / MANIFEST):
            raise  # a report would list "backends here: emulate no, cpu no, ..." for a mistyped path
        m = None
        problems.append(str(e))
    if m is not None:
        for what, f in m.files():
            files += 1
            problem = size_problem(f, what) or (None if quick else sha256_problem(directory, f, what))
            if problem:
                problems.append(problem)
        if not problems:
            try:
                Bundle.open(directory)  # the host tensors' header too
            except BundleError as e:
                problems.append(str(e))
            except MissingPackageError:
                pass  # machine()["missing"] says which, and how to install it
        tpu = m.tpu_layers
        flavors = set.intersection(*(set(layer.files) for layer in tpu)) if tpu else {"params", "cpu", "edgetpu"}
    have = machine()
    ok = not problems and have["packages"]["safetensors"]
    backends = {
        "emulate": ok and "params" in flavors,
        "cpu": ok and "cpu" in flavors and have["interpreter"] is not None,
        "edgetpu": ok and "edgetpu" in flavors and have["interpreter"] is not None
                   and have["libedgetpu"] is not None and bool(have["edgetpu_devices"]),
        "fp32": False,  # runs the float checkpoint (--checkpoint DIR): a bundle carries no float weights for it
    }
    notes = []  # what runs here, but a slower way than the bundle allows
    if backends["cpu"] and m.int8_head is not None:
        try:
            _, note = open_int8_tiles(m.int8_head, open_all=True)
            notes += [note] if note else []
        except BundleError as e:  # with --quick, a tile of the right size but broken inside
            problems.append(str(e))
            ok = backends["cpu"] = backends["edgetpu"] = False
    return {"ok": ok, "problems": problems, "backends": backends, "machine": have, "files": files,
            "checked": "sizes" if quick else "sha256", "routes": route_plan(m) if m is not None else None,
            "notes": notes}


def route_plan(m) -> dict | None:
    """What `--route auto` does with this bundle: the cost model it was built with, and per
    threshold (rows per call from which the TPU is cheaper) the layers that have it; None
    when the bundle has no routes. The cost model's figures are in the manifest; the file
    they came from is the build host's (`doit deploy` does not carry bench/ to a Pi), so it
    is named as such, not as a file to look for here."""
    if not m.manifest.get("route"):
        return None
    by_rows = Counter(str(layer.tpu_from_rows or "never") for layer in m.layers
                      if layer.placement == "tpu")  # not the LM-head tiles
    source = m.manifest["route"].get("cost_model")
    return {"cost_model": f"{MANIFEST}'s device figures" + (f", from the build host's {source}" if source else ""),
            "tpu_from_rows": dict(sorted(by_rows.items(), key=lambda kv: (kv[0] == "never", kv[0])))}


def sha256_problem(directory: str | Path, f, what: str) -> str | None:
    try:
        digest = sha256_file(f.path)
    except OSError as e:  # e.g. permission denied
        return f"{f.path}: cannot be read ({e.strerror or e}) (named by {MANIFEST} as the {what})"
    if digest != f.sha256:
        return f"{f.path}: sha256 differs from {Path(directory) / MANIFEST} ({what})"
    return None


def selftest(directory: str | Path, rows: int = 16, seed: int = 0) -> dict:
    """{"ok", "status" (the exit status), "templates": one entry per template tested, "error"
    (why nothing could be tested, or None)}; see the module docstring."""
    bundle = Bundle.open(directory)

    def untested(error: str) -> dict:
        return {"ok": False, "status": 2, "templates": [], "error": error}

    try:
        delegates = edgetpu_delegates()
    except (BackendError, MissingPackageError) as e:
        return untested(f"no Edge TPU to test here: {e}")
    by_template: dict[tuple, list] = {}
    for layer in bundle.tpu_layers:
        if "edgetpu" in layer.files:
            by_template.setdefault((layer.n_in, layer.n_out, layer.batch), []).append(layer)
    if not by_template:
        return untested(f"{bundle.dir}: no edgetpu artifacts to test (built without a compiled template)")
    rng = np.random.default_rng(seed)
    templates = []
    for (n_in, n_out, batch), layers in sorted(by_template.items()):
        a, b = layers[0], layers[1] if len(layers) > 1 else layers[0]
        x = rng.integers(0, 256, (rows, n_in), dtype=np.uint8)
        device = {layer.name: TemplateInterpreter(layer.files["edgetpu"].path, layer, delegates) for layer in (a, b)}
        worst = 0
        for layer in (a, b, a):  # A, B, then A again: its parameters must be A's, not B's
            expected = LazyDense(layer.files["params"].path, layer, "emulate")(x).astype(int)
            worst = max(worst, int(np.abs(device[layer.name](x).astype(int) - expected).max()))
        templates.append({"template": f"{n_in}x{n_out}b{batch}", "layers": [a.name, b.name],
                          "max_difference": worst, "agrees": worst <= 1})
    ok = all(t["agrees"] for t in templates)
    return {"ok": ok, "status": 0 if ok else 1, "templates": templates, "error": None}
