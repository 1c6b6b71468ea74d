"""Open a bundle: read `manifest.json`, check it, and memory-map the files it names.

Nothing is quantized, patched, decoded or copied here: the host tensors are
read-only views of `host.safetensors` in memory, and each layer's files are
opened by the backend that runs them. The manifest comes from outside (a copy
over the network), so every field is checked before it is used, and no path may
leave the bundle directory (absolute, `..`, or a symlink pointing out).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from .checkpoint import safetensors_layout
from .config_values import ConfigError
from .errors import UserError
from .families import FAMILIES
from .files import get_field, read_document
from .packages import MissingPackageError

SHA256_HEX = re.compile("[0-9a-f]{64}")

FORMAT = "coral-bundle"
VERSION = 1
# The manifest's fields, declared once: prepare/stages/bundle.py writes exactly these, in this
# order; read_manifest checks every one the runner uses (the rest record how it was built).
FIELDS = ("format", "version", "name", "family", "towers", "config", "quantization", "smoothing", "flavors",
          "cpu_layers", "templates", "host", "tokenizer", "chat", "tools", "layers", "lm_head", "int8_head", "route",
          "target")
FILE_FIELDS = ("path", "sha256", "bytes")  # a file entry: host, tokenizer, chat, tools, a layer's flavors
LAYER_FIELDS = ("name", "in", "out", "placement")  # every layer
TPU_LAYER_FIELDS = ("batch", "zp_in", "zp_out", "error")  # a layer a Dense template runs, and where they apply:
OPTIONAL_TPU_FIELDS = ("outputs", "parts", "input_scale", "tpu_from_rows")  # (runner/bundle.py `Layer`)
MANIFEST = "manifest.json"
CHAT_FILES = ("tokenizer_config.json", "chat_template.jinja")  # where transformers looks for a chat template
TOOLS_FILE = "tools.json"  # a recipe's tools (OpenAI form), carried for `runner call`
HOST_FILE = "host.safetensors"
MAX_MANIFEST_BYTES = 64 << 20
FLAVORS = ("params", "cpu", "edgetpu")
SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "I8": "i1", "U8": "u1", "I32": "<i4", "I64": "<i8"}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class BundleError(UserError):
    """A bundle that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class BundleFile:
    path: Path  # absolute, inside the bundle
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Layer:
    name: str
    n_in: int
    n_out: int
    placement: str  # "tpu": a Dense template runs it; "host": float on the CPU
    batch: int = 0
    zp_in: int = 0
    zp_out: int = 0
    files: dict | None = None  # flavor -> BundleFile
    input_scale: float | None = None  # static activations (quantization.activations): one scale per layer
    # The outputs that are the layer's when its template is wider (`pad_outputs`): the first
    # `outputs` of n_out; the rest come from zero rows and are dropped (runner/quant.py).
    outputs: int | None = None
    # A fused layer (the recipe's `fuse`): the layers it computes at once, (name, outputs) in
    # order; the model still asks for each by name (runner/nn.py `with_fused`).
    parts: tuple = ()
    # The rows per call from which the TPU is cheaper than the `cpu` flavor, by the cost model
    # the bundle was built with (manifest `route`); None: the CPU always (runner `--route auto`).
    tpu_from_rows: int | None = None


_field = partial(get_field, BundleError)


class HostTensors:
    """Read-only float tensors of `host.safetensors`, memory-mapped, by name.

    safetensors validates the header (offsets inside the file, contiguous, no
    overlap); the arrays are then numpy views into one memory map, so opening costs
    no copy and a tensor's pages are read only when it is used."""

    def __init__(self, path: Path):
        try:
            layout = safetensors_layout(path)
        except MissingPackageError:
            raise  # not the file's fault
        except Exception as e:  # safetensors raises its own error type for a bad header
            raise BundleError(f"{path}: not a valid safetensors file ({e})") from e
        self.path = path
        # A plain ndarray view of the map: slices of an np.memmap are memmaps, slower to make.
        self._map = np.memmap(path, np.uint8, mode="r").view(np.ndarray)
        self._specs = {}
        for name, (dtype, shape, begin, end) in layout.items():
            if dtype not in SAFETENSORS_DTYPES:
                raise BundleError(f"{path}: tensor {name!r} has dtype {dtype}, not one the runner reads")
            self._specs[name] = (np.dtype(SAFETENSORS_DTYPES[dtype]), shape, begin, end)

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def keys(self):
        return self._specs.keys()

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._specs:
            raise BundleError(f"{self.path}: tensor {name!r} is missing")
        dtype, shape, begin, end = self._specs[name]
        return self._map[begin:end].view(dtype).reshape(shape)

    def get(self, name: str, default=None):
        return self[name] if name in self._specs else default


class Bundle:
    def __init__(self, directory: Path, manifest: dict, layers: list[Layer], host: HostTensors,
                 tokenizer: BundleFile | None, lm_head: LMHead | None = None, int8_head: Int8Head | None = None,
                 chat: list[BundleFile] | None = None, tools: BundleFile | None = None):
        self.dir, self.manifest, self.layers, self.host, self.tokenizer = directory, manifest, layers, host, tokenizer
        self.lm_head, self.int8_head, self.chat, self.tools = lm_head, int8_head, chat or [], tools
        self.family: str = manifest["family"]
        self.config: dict = manifest["config"]
        self.towers: list[str] = manifest["towers"]

    @classmethod
    def open(cls, directory: str | Path, flavor: str | None = None, manifest: "Manifest | None" = None) -> "Bundle":
        """Read and check the manifest (unless given, read already), check the presence and
        size (not the sha256: that is `runner check`) of every file, or with `flavor` of the
        files a backend running that flavor opens, and memory-map the host tensors."""
        m = manifest or read_manifest(directory)
        for what, f in m.files(flavor):
            problem = size_problem(f, what)
            if problem:
                raise BundleError(problem)
        return cls(m.dir, m.manifest, m.layers, HostTensors(m.host.path), m.tokenizer, m.lm_head, m.int8_head, m.chat,
                   m.tools)

    @property
    def tpu_layers(self) -> list[Layer]:
        return tpu_layers(self.layers, self.lm_head)

    def model_config(self):
        """The model's config (its family's config class), checked as `read_manifest` checked it."""
        return model_config(self.family, self.config, str(self.dir / MANIFEST))


@dataclass(frozen=True)
class LMHead:
    """A tied LM head as TPU tiles: tile i computes vocabulary rows [i * tile_rows, (i + 1) * tile_rows);
    the last tile's rows past `vocab_size` are padding."""
    tile_rows: int
    vocab_size: int
    tiles: list[Layer]


@dataclass(frozen=True)
class Int8Head:
    """A tied head's int8 table as hybrid TFLite models (float in, per-channel int8 weights,
    float out): file i computes vocabulary rows [i * tile_rows, (i + 1) * tile_rows), for
    batches of `batch` rows; the last file's rows past `vocab_size` are zero padding."""
    table: str
    tile_rows: int
    vocab_size: int
    n_in: int
    batch: int
    files: list[BundleFile]


@dataclass
class Manifest:
    dir: Path
    manifest: dict
    layers: list[Layer]
    host: BundleFile
    tokenizer: BundleFile | None
    lm_head: LMHead | None = None
    int8_head: Int8Head | None = None
    chat: list[BundleFile] = field(default_factory=list)  # tokenizer_config.json, chat_template.jinja
    tools: BundleFile | None = None  # tools.json: the recipe's tools, `runner call`'s when given none

    @property
    def tpu_layers(self) -> list[Layer]:
        return tpu_layers(self.layers, self.lm_head)

    def files(self, flavor: str | None = None) -> list[tuple[str, BundleFile]]:
        """Every file the manifest names (with `flavor`, of the layers only that flavor's),
        with what it is for."""
        out = [("host tensors", self.host)] + ([("tokenizer", self.tokenizer)] if self.tokenizer else [])
        out += [(f"chat {f.path.name}", f) for f in self.chat] + ([("tools", self.tools)] if self.tools else [])
        for layer in self.tpu_layers:
            out += [(f"layer {layer.name} {f}", file) for f, file in layer.files.items() if flavor in (None, f)]
        if self.int8_head and flavor != "params":  # the cpu head's, on the interpreter backends
            out += [(f"int8 head tile {i}", file) for i, file in enumerate(self.int8_head.files)]
        return out


def tpu_layers(layers: list[Layer], lm_head: LMHead | None) -> list[Layer]:
    """Every layer a Dense template runs: the model's, then the LM-head tiles."""
    return [layer for layer in layers if layer.placement == "tpu"] + (lm_head.tiles if lm_head else [])


def bundle_guesses(directory: Path) -> list[Path]:
    """Where a bundle given by its name (or another relative path) may be: under the build
    host's artifacts directory (`artifacts/`, or CORAL_ARTIFACTS where set), and under
    `bundles/`, where `doit deploy` puts it on a Pi."""
    if directory.is_absolute():
        return []
    roots = [Path(os.environ["CORAL_ARTIFACTS"]) / "bundles"] if os.environ.get("CORAL_ARTIFACTS") else []
    return [root / directory for root in (*roots, Path("artifacts") / "bundles", Path("bundles"))]


def read_manifest(directory: str | Path) -> Manifest:
    """Parse and check `manifest.json`: schema, version, every field's type, every path inside."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not os.path.lexists(path):
        found = [d for d in bundle_guesses(directory) if (d / MANIFEST).is_file()]
        raise BundleError(f"{directory}: not a bundle (no {MANIFEST}" + (f"); did you mean {found[0]}?" if found else
                                                                         "; build one with doit)"))
    manifest = read_document(path, BundleError, MAX_MANIFEST_BYTES, FORMAT, VERSION, "bundle",
                             "rebuild the bundle, or update the runner")
    where = str(path)
    family = _field(where, manifest, "family", str)
    model_config(family, _field(where, manifest, "config", dict), where)
    _field(where, manifest, "towers", list, lambda v: all(isinstance(t, str) for t in v))

    real_dirs: dict = {}

    def file(entry, what) -> BundleFile:
        w = f"{where}: {what}"
        return BundleFile(safe_path(directory, _field(w, entry, "path", str), w, real_dirs),
                          _field(w, entry, "sha256", str,
                                 lambda s: SHA256_HEX.fullmatch(s) is not None),
                          _field(w, entry, "bytes", int, lambda n: n >= 0))

    host = file(_field(where, manifest, "host", dict), "host")
    tokenizer = manifest.get("tokenizer")
    tokenizer = file(tokenizer, "tokenizer") if tokenizer is not None else None
    def layer(e, w) -> Layer:
        name = _field(w, e, "name", str)
        dims = [_field(w, e, k, int, lambda v: 0 < v <= 1 << 20) for k in ("in", "out")]
        placement = _field(w, e, "placement", str, lambda v: v in ("tpu", "host"))
        if placement == "host":
            return Layer(name, *dims, placement)
        files = {}
        for flavor, entry in _field(w, e, "files", dict).items():
            if flavor not in FLAVORS:
                raise BundleError(f"{w}: unknown file flavor {flavor!r}")
            files[flavor] = file(entry, f"layer {name} {flavor}")
        if "params" not in files:
            raise BundleError(f"{w}: layer {name} has no parameter file")
        input_scale = None
        if e.get("input_scale") is not None:
            input_scale = float(_field(w, e, "input_scale", (int, float), lambda v: 0 < v <= sys.float_info.max))
        outputs = None
        if e.get("outputs") is not None:
            outputs = _field(w, e, "outputs", int, lambda v: 0 < v <= dims[1])
        parts = ()
        if e.get("parts") is not None:
            parts = tuple((p[0], p[1]) for p in _field(w, e, "parts", list, lambda v: len(v) >= 2 and all(
                isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and type(p[1]) is int and p[1] > 0
                for p in v) and sum(p[1] for p in v) == (outputs or dims[1])))
        tpu_from_rows = None
        if e.get("tpu_from_rows") is not None:
            tpu_from_rows = _field(w, e, "tpu_from_rows", int, lambda v: v >= 1)
        return Layer(name, *dims, placement, _field(w, e, "batch", int, lambda v: 0 < v <= 4096),
                     _field(w, e, "zp_in", int, lambda v: 0 <= v <= 255),
                     _field(w, e, "zp_out", int, lambda v: 0 <= v <= 255), files, input_scale, outputs, parts,
                     tpu_from_rows)

    layers = [layer(e, f"{where}: layers[{i}]") for i, e in enumerate(_field(where, manifest, "layers", list))]
    head = manifest.get("lm_head")
    if head is not None:
        head = _lm_head(where, head, layer)
    int8_head = manifest.get("int8_head")
    if int8_head is not None:
        w = f"{where}: int8_head"
        rows = _field(w, int8_head, "tile_rows", int, lambda v: 0 < v <= 1 << 20)
        vocab = _field(w, int8_head, "vocab_size", int, lambda v: 0 < v <= 1 << 24)
        files = _field(w, int8_head, "files", list, lambda v: len(v) == -(-vocab // rows))
        int8_head = Int8Head(_field(w, int8_head, "table", str), rows, vocab,
                             _field(w, int8_head, "in", int, lambda v: 0 < v <= 1 << 20),
                             _field(w, int8_head, "batch", int, lambda v: 0 < v <= 16),
                             [file(e, f"int8_head.files[{i}]") for i, e in enumerate(files)])
    chat = []
    for i, e in enumerate(_field(where, manifest, "chat", list) if manifest.get("chat") is not None else []):
        if not (isinstance(e, dict) and e.get("path") in CHAT_FILES):
            raise BundleError(f"{where}: chat[{i}]: one of {', '.join(CHAT_FILES)}, beside the manifest")
        chat.append(file(e, f"chat[{i}]"))
    tools = manifest.get("tools")
    if tools is not None:
        if not (isinstance(tools, dict) and tools.get("path") == TOOLS_FILE):
            raise BundleError(f"{where}: tools: {TOOLS_FILE}, beside the manifest")
        tools = file(tools, "tools")
    return Manifest(directory, manifest, layers, host, tokenizer, head, int8_head, chat, tools)


def _lm_head(where: str, head: dict, layer) -> "LMHead":
    """The manifest's `lm_head`: tiles that cover the vocabulary in order, all one shape on the TPU."""
    w = f"{where}: lm_head"
    rows = _field(w, head, "tile_rows", int, lambda v: 0 < v <= 1 << 20)
    vocab = _field(w, head, "vocab_size", int, lambda v: 0 < v <= 1 << 24)
    entries = _field(w, head, "tiles", list, lambda v: len(v) == -(-vocab // rows))
    tiles = []
    for i, e in enumerate(entries):
        t = layer(e, f"{w}.tiles[{i}]")
        span = [i * rows, min((i + 1) * rows, vocab)]
        _field(f"{w}.tiles[{i}]", e, "rows", list, lambda v: v == span)
        if t.placement != "tpu" or t.n_out != rows or t.n_in != (tiles[0] if tiles else t).n_in:
            raise BundleError(f"{w}.tiles[{i}]: a TPU layer of {rows} outputs like the other tiles, "
                              f"got {t.placement} {t.n_in}x{t.n_out}")
        tiles.append(t)
    return LMHead(rows, vocab, tiles)


def model_config(family: str, config: dict, where: str):
    """The manifest's `config` as the family's config (runner/families.py), every value checked."""
    if family not in FAMILIES:
        raise BundleError(f"{where}: family {family!r} is not one this runner reads ({', '.join(FAMILIES)})")
    try:
        return FAMILIES[family].config_class.from_dict(config)
    except ConfigError as e:
        raise BundleError(f"{where}: {e}") from e


def size_problem(f: BundleFile, what: str) -> str | None:
    try:
        st = f.path.stat()
    except FileNotFoundError:
        return f"{f.path}: missing (named by {MANIFEST} as the {what})"
    except OSError as e:  # e.g. a name longer than the file system allows
        return f"{f.path}: cannot be read ({e.strerror}) (named by {MANIFEST} as the {what})"
    if not stat.S_ISREG(st.st_mode):
        return f"{f.path}: not a regular file (named by {MANIFEST} as the {what})"
    if not os.access(f.path, os.R_OK):
        return f"{f.path}: cannot be read (permission denied) (named by {MANIFEST} as the {what})"
    size = st.st_size
    if size != f.bytes:
        return f"{f.path}: {size} bytes, {MANIFEST} says {f.bytes} ({what})"
    return None


def safe_path(directory: Path, rel: str, where: str, real_dirs: dict | None = None) -> Path:
    """`directory / rel`, refused when it is absolute, climbs with `..`, or resolves
    (through symlinks) outside the directory. `real_dirs` caches each directory's real
    path across one manifest's files. Strings and os.path, not pathlib: this runs for
    every file at every start-up, and resolving each in full was most of it."""
    try:
        if "\0" in rel:
            raise ValueError("a NUL character")
        os.fsencode(rel)
    except (ValueError, UnicodeEncodeError) as e:  # os functions would raise these
        raise BundleError(f"{where}: path {rel[:300]!r} is not a file name ({e})") from e
    parts = rel.split("/")
    if not rel or rel.startswith("/") or ".." in parts or "\\" in rel:
        raise BundleError(f"{where}: path {rel!r} leaves the bundle")
    base = str(directory)
    full = os.path.join(base, rel)
    real_dirs = {} if real_dirs is None else real_dirs
    real_base, _ = _real_dir(base, real_dirs)
    real_parent, links = _real_dir(os.path.dirname(full), real_dirs)
    real = os.path.join(real_parent, parts[-1])
    if parts[-1] in links:  # os.path, not pathlib: a symlink loop stays inside, then reads as missing
        real = os.path.realpath(real)
    if not real.startswith(real_base + os.sep):
        raise BundleError(f"{where}: path {rel!r} leads out of the bundle (through a symlink)")
    return Path(full)


def _real_dir(directory: str, cache: dict) -> tuple[str, set[str]]:
    """A directory's real path and the names of the symlinks in it, once per manifest: one
    listing of a directory, not an lstat of each of its 200 files at every start-up."""
    if directory not in cache:
        real = os.path.realpath(directory)
        try:
            with os.scandir(real) as entries:
                links = {e.name for e in entries if e.is_symlink()}
        except OSError:  # missing or unreadable: its files are reported as such when opened
            links = set()
        cache[directory] = (real, links)
    return cache[directory]
