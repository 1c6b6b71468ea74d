"""The four ways to run a linear layer (design.md), behind one interface: `linear(name, x)`.

- `emulate`: the layer's exact parameter bytes, decoded, in exact integer arithmetic;
- `cpu`: the patched uncompiled template through LiteRT / tflite-runtime;
- `edgetpu`: the patched compiled template through the libedgetpu delegate;
- `fp32`: the original float weights (from the checkpoint; bundles carry none for TPU layers).

For the first three the host quantizes each row, the Dense template runs uint8 rows,
and the host dequantizes (runner/quant.py). A compiled template runs `batch` rows per
call (more rows are split, the last chunk padded); the `cpu` flavor takes each call's rows
in one invoke. Layers the recipe kept on the CPU run in float whatever the backend.
"""

from __future__ import annotations

import ctypes.util
import math
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bundle import Bundle, BundleError, Layer
from .edgetpu_codec import decode_dense
from .emulate import DenseEmulator
from .errors import UserError
from .interpreter import (INTERPRETER, drop_file_pages, load_delegate, quiet_info, require_interpreter, threads,
                          without_xnnpack)
from .nn import float_linear, layer_bias, with_fused
from .quant import QuantizedLinear

BACKENDS = ("emulate", "cpu", "edgetpu", "fp32")
ROUTES = ("auto", "tpu", "cpu")  # where a TPU layer's calls go (make_linear)
EDGETPU_LIBRARY = {"Linux": "libedgetpu.so.1", "Darwin": "libedgetpu.1.dylib", "Windows": "edgetpu.dll"}


class BackendError(UserError):
    """A backend this machine cannot run; the message says what is missing."""


class InterpreterTooOld(BundleError):
    """A model that uses an operator version this interpreter predates: the build host's
    TensorFlow writes the versions it knows (the LM head's hybrid FULLY_CONNECTED is
    version 12), and tflite-runtime's last release, 2.14, stops short of some."""


# How TFLite (LiteRT and tflite-runtime alike) refuses an operator version it lacks.
OP_VERSION_REFUSED = re.compile(r"Didn't find op for builtin opcode '(\w+)' version '(\d+)'")


class LazyDense:
    """One layer's Dense backend, opened on its first call. Start-up then only maps files;
    the first forward pays for decoding (emulate) or opening an interpreter (cpu, edgetpu),
    and layers a run never reaches (LM-head tiles a shortlist skips) cost nothing."""

    def __init__(self, path: Path, layer: Layer, backend: str, delegates=None):
        self.path, self.layer, self.backend, self.delegates, self._dense = path, layer, backend, delegates, None

    def load(self):
        if self._dense is None:
            if self.backend == "emulate":
                blob = np.memmap(self.path, np.uint8, mode="r")
                params = decode_dense(blob, self.layer.n_in, self.layer.n_out, str(self.path))
                self._dense = DenseEmulator(params, self.layer.zp_in, self.layer.zp_out)
            else:
                self._dense = TemplateInterpreter(self.path, self.layer, self.delegates)
        return self._dense

    def __call__(self, x_u8: np.ndarray) -> np.ndarray:
        return self.load()(x_u8)


MAX_ROWS = 128  # rows per invoke of an uncompiled template (TemplateInterpreter)


class TemplateInterpreter:
    """A patched template, uncompiled or compiled with the Edge TPU delegate.

    A compiled template runs its `batch` rows per call, as the compiler fixed them: more rows
    are split and the last chunk padded. An uncompiled one (no delegates) is resized to
    each call's rows instead, since a fully connected layer treats rows independently: one
    invoke for a whole CLIP image, where `batch` at a time took 13 invokes (and a Gemma
    prompt up to 256), the interpreter's per-call cost each time. Calls of more than
    MAX_ROWS rows go in equal chunks of at most that many: each interpreter keeps buffers
    for the most rows it has run, and with 98 CLIP layers sized for 8 images (400 rows) the
    process peaked at 445 MiB, against 363 MiB in chunks of 100 (and no slower). Resizing
    costs about 0.1 ms and happens only when the chunk size changes (prefill to decode).

    `model` is a file (memory-mapped by the interpreter) or the model's bytes; with `layer`,
    the model's shape must be the one the manifest gives. `xnnpack=False`: TFLite's builtin
    kernels only (runner/interpreter.py `without_xnnpack`). `kept`: once XNNPACK has packed
    the weights, the file's pages are given back (`drop_file_pages`), for the int8 LM head's
    tiles (168 MB at 270M). Finding the mapping takes 0.6 ms (a read of /proc/self/maps), so
    the layers keep theirs: it would add 45 ms to Gemma-270M's first token for 90 MB."""

    def __init__(self, model: Path | bytes, layer: Layer | None = None, delegates=None, xnnpack: bool = True,
                 kept: bool = False):
        Interpreter = require_interpreter()
        where = "model bytes" if isinstance(model, bytes) else str(model)
        source = {"model_content": model} if isinstance(model, bytes) else {"model_path": str(model)}
        try:
            with quiet_info():
                self.interpreter = Interpreter(**source, experimental_delegates=delegates, num_threads=threads(),
                                               **({} if xnnpack else without_xnnpack()))
                self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            lacking = OP_VERSION_REFUSED.search(reason)
            if lacking:
                raise InterpreterTooOld(f"{where}: {INTERPRETER} has no {lacking[1]} version {lacking[2]}, "
                                        "which this model uses (ai-edge-litert has)") from e
            raise BundleError(f"{where}: the interpreter refuses this model ({reason})") from e
        if kept and xnnpack and not delegates and not isinstance(model, bytes):
            drop_file_pages(model)  # XNNPACK has packed the weights: the file's pages are not read again
        inp, out = self.interpreter.get_input_details()[0], self.interpreter.get_output_details()[0]
        if layer is not None and (tuple(inp["shape"]) != (layer.batch, layer.n_in) or out["shape"][-1] != layer.n_out):
            raise BundleError(f"{where}: model runs {list(inp['shape'])} -> {list(out['shape'])}, "
                              f"the manifest says batch {layer.batch} of {layer.n_in} -> {layer.n_out}")
        self.batch, self.n_in = int(inp["shape"][0]), int(inp["shape"][-1])
        self._in, self._out = inp["index"], out["index"]
        self._pad = np.zeros((self.batch, self.n_in), inp["dtype"])
        self.resizable, self._rows = not delegates, self.batch

    def _fit(self, n: int) -> None:
        """Resize to the chunk size for a call of n rows: equal chunks of at most MAX_ROWS."""
        rows = -(-n // -(-n // MAX_ROWS))
        if rows != self._rows:
            self.interpreter.resize_tensor_input(self._in, [rows, self.n_in])
            self.interpreter.allocate_tensors()
            self._rows, self._pad = rows, np.zeros((rows, self.n_in), self._pad.dtype)

    def __call__(self, x_u8: np.ndarray) -> np.ndarray:
        if self.resizable and len(x_u8) != self._rows and len(x_u8):
            self._fit(len(x_u8))
        if len(x_u8) == self._rows:  # one invoke, nothing to pad or cut: every call of a decode step
            self.interpreter.set_tensor(self._in, x_u8)
            self.interpreter.invoke()
            return self.interpreter.get_tensor(self._out)
        outputs = []
        for k in range(0, len(x_u8), self._rows):
            chunk = x_u8[k : k + self._rows]
            if len(chunk) < self._rows:  # pad the last chunk; its extra rows are dropped below
                self._pad[: len(chunk)] = chunk
                chunk = self._pad
            self.interpreter.set_tensor(self._in, chunk)
            self.interpreter.invoke()
            outputs.append(self.interpreter.get_tensor(self._out))
        return outputs[0][: len(x_u8)] if len(outputs) == 1 else np.concatenate(outputs)[: len(x_u8)]


def edgetpu_library() -> str | None:
    """The Edge TPU runtime library's name if this machine can load it, else None."""
    library = EDGETPU_LIBRARY.get(platform.system(), "libedgetpu.so.1")
    if ctypes.util.find_library("edgetpu"):
        return ctypes.util.find_library("edgetpu")
    try:
        ctypes.CDLL(library)
        return library
    except OSError:
        return None


def edgetpu_delegates() -> list:
    """The libedgetpu delegate (pycoral's helper where it is installed), or a clear error."""
    library = EDGETPU_LIBRARY.get(platform.system(), "libedgetpu.so.1")
    try:  # pycoral is optional (few platforms have a wheel): without it, the delegate is loaded by name
        from pycoral.utils.edgetpu import list_edge_tpus, load_edgetpu_delegate
    except ImportError:
        list_edge_tpus = load_edgetpu_delegate = None
    if load_edgetpu_delegate is not None:
        if not list_edge_tpus():
            raise BackendError("pycoral finds no Edge TPU: is the Coral plugged in, and may this user use it "
                               "(udev rules; see the README's guide)?")
        return [load_edgetpu_delegate()]
    require_interpreter()
    if edgetpu_library() is None:
        raise BackendError(f"the Edge TPU library {library} is not installed (package libedgetpu1-std; "
                           "see the README's guide)")
    try:
        return [load_delegate(library)]
    except (ValueError, RuntimeError, OSError) as e:
        raise BackendError(f"{library} is installed but found no usable Edge TPU ({e}): is the Coral plugged "
                           "in, may this user use it (udev rules), and does the library match the "
                           "interpreter's version?") from e


FLAVOR = {"emulate": "params", "cpu": "cpu", "edgetpu": "edgetpu"}  # the artifact each backend runs


def check_flavor(bundle: Bundle, layers: list[Layer], backend: str) -> str:
    """The file flavor `backend` runs, once every layer is known to have it."""
    if backend not in FLAVOR:
        raise BackendError(f"backend {backend!r} is not one of {', '.join(FLAVOR)} here")
    flavor = FLAVOR[backend]
    if backend != "emulate":  # layers open their interpreters on first use: say now if there is none
        require_interpreter()
    missing = [layer.name for layer in layers if flavor not in layer.files]
    if missing:
        raise BackendError(f"{bundle.dir}: no {backend} artifacts for {len(missing)} layer(s), e.g. {missing[0]} "
                           f"(the bundle was built with flavors {bundle.manifest.get('flavors')}"
                           + (" and without a compiled template: see `doit templates=DIR`" if flavor == "edgetpu"
                              else "") + ")")
    return flavor


def quantized_layer(bundle: Bundle, layer: Layer, backend: str, delegates=None) -> QuantizedLinear:
    """One TPU layer of the bundle on `backend`: host quantization around its Dense artifact."""
    dense = LazyDense(layer.files[FLAVOR[backend]].path, layer, backend, delegates)
    host = bundle.host
    outputs = layer.outputs or layer.n_out
    for t in ("weight_scale", "multipliers"):
        if host[f"{layer.name}.{t}"].shape != (outputs,):
            raise BundleError(f"{host.path}: {layer.name}.{t} has shape {list(host[f'{layer.name}.{t}'].shape)}, "
                              f"the layer has {outputs} outputs")
    return QuantizedLinear(dense, host[f"{layer.name}.weight_scale"], host[f"{layer.name}.multipliers"],
                           layer_bias(host, layer.name, layer.parts), layer.zp_in, layer.zp_out, layer.input_scale)


@dataclass
class Routes:
    """Where a run's linear calls went, by what ran them (a backend, or `host`: the float
    layers the recipe kept on the CPU): calls and rows. `--json`'s `routes`."""

    route: str
    calls: dict = field(default_factory=dict)
    rows: dict = field(default_factory=dict)

    def count(self, side: str, rows: int) -> None:
        self.calls[side] = self.calls.get(side, 0) + 1
        self.rows[side] = self.rows.get(side, 0) + rows

    def to_json(self) -> dict:
        return {"route": self.route, **{side: {"calls": self.calls[side], "rows": self.rows[side]}
                                        for side in sorted(self.calls)}}


def make_linear(bundle: Bundle, backend: str, delegates=None, route: str = "tpu", routes: Routes | None = None):
    """The executor `linear(name, x)` running the bundle's layers on `backend` (not fp32).
    The LM-head tiles are not among them: runner/lm_head.py runs those.

    `route` (for the edgetpu and emulate backends, which stand for the TPU): `tpu` runs
    every TPU layer there; `cpu` runs them all on their `cpu` flavor instead; `auto` sends
    each call by its rows, to the TPU from the layer's `tpu_from_rows` (the build's cost
    model) and to the `cpu` flavor below it: Gemma's one-row decode steps to the CPU, a
    long prefill to the TPU. `routes` counts where the calls went."""
    if route not in ROUTES:
        raise BackendError(f"route {route!r} is not one of {', '.join(ROUTES)}")
    tpu = [layer for layer in bundle.layers if layer.placement == "tpu"]
    check_flavor(bundle, tpu, backend)
    routed = route != "tpu" and backend in ("edgetpu", "emulate")
    if routed:
        check_flavor(bundle, tpu, "cpu")
        if route == "auto" and bundle.manifest.get("route") is None:
            raise BackendError(f"{bundle.dir}: built without routes (they need both the edgetpu and the cpu "
                               "flavor in the recipe): use --route tpu or --route cpu")
    if backend == "edgetpu" and delegates is None:
        delegates = edgetpu_delegates()
    on_tpu = {layer.name: layer for layer in tpu}
    missing = [f"{name}.{t}" for name in on_tpu for t in ("weight_scale", "multipliers") if f"{name}.{t}" not in bundle.host]
    if missing:
        raise BundleError(f"{bundle.host.path}: {len(missing)} tensor(s) the TPU layers need are missing, e.g. {missing[0]}")
    made: dict[tuple[str, str], QuantizedLinear] = {}  # each made on its first call, like its Dense backend
    # Layers that read one input (q, k and v; gate and up, unless the recipe fused them) quantize
    # it once: the last input (kept, so its id is not another's) and its codes by (zero point,
    # input scale). As in `with_fused`, models never change an array in place once a linear read it.
    last: list = [None, {}]
    on_host = float_linear(bundle.host)  # layers the recipe kept on the CPU: their float weights are in the bundle
    routes = routes if routes is not None else Routes(route)

    def side(layer: Layer, rows: int) -> str:
        if not routed:
            return backend
        if route == "auto" and layer.tpu_from_rows is not None and rows >= layer.tpu_from_rows:
            return backend
        return "cpu"

    def linear(name: str, x: np.ndarray) -> np.ndarray:
        rows = math.prod(x.shape[:-1])
        if name not in on_tpu:
            routes.count("host", rows)
            return on_host(name, x)
        where = side(on_tpu[name], rows)
        routes.count(where, rows)
        layer = made.get((name, where))
        if layer is None:
            layer = made[name, where] = quantized_layer(bundle, on_tpu[name], where, delegates)
        if last[0] is not x:
            last[:] = [x, {}]
        key = (layer.zp_in, layer.input_scale)
        quantized = last[1].get(key)
        if quantized is None:
            quantized = last[1][key] = layer.quantize(x)
        return layer(x, quantized)
    return with_fused(linear, {layer.name: layer.parts for layer in tpu if layer.parts})
