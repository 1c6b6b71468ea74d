"""Long fuzz run over every parser of outside input, outside the test suite (issue #9).

    nice .venv/bin/python bench/fuzz_parsers.py --parser all --cases 100000 [--seed 1]

Parsers, each called in process the way the project calls it, each with its documented error:

| parser | entry point | documented error |
| --- | --- | --- |
| tflite | `prepare.inspection.inspect` and `prepare.dense_templates.describe` of an uncompiled template | FormatError |
| edgetpu | `inspect(compiled, uncompiled)` and `parse_compiled(...).dense_params()` (TFLite, FlexBuffer, DWN1) | FormatError |
| checkpoint | the build's `open_checkpoint` (config.json, safetensors headers, every tensor), CLIP and Gemma | CheckpointError |
| recipe | `prepare.recipe.load_recipe` | RecipeError |
| manifest | `runner.bundle.Bundle.open` and the model config (manifest.json, host.safetensors header) | BundleError |

Each case is a mutation of a valid input: structure-aware (flatbuffer offsets and lengths,
JSON/YAML trees with values of the wrong type or size, safetensors headers that lie about
offsets, shapes and dtypes, manifest paths that are absolute, climb out or lead through
symlinks) or plain bytes (flips, truncations, random files). Anything but the documented
error counts as undocumented; a case over `--time-limit-ms` is stopped (SIGALRM) and counted
as a hang; every `--memory-every`th case runs under tracemalloc and its peak is compared
with the input's size (`memory.worst_ratio`: the largest (peak - 8 MiB) / input bytes, 0 when
every peak stayed under 8 MiB; `over_limit`: cases above 8 MiB + 32 x input). Results: bench/results/fuzz-<date>.json (merged per parser), the
first few undocumented errors with a reproducer under bench/results/fuzz-cases/ (git-ignored).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import resource
import signal
import sys
import tempfile
import time
import traceback
import tracemalloc
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prepare.dense_templates import describe  # noqa: E402
from prepare.families import clip as clip_build  # noqa: E402
from prepare.families import gemma as gemma_build  # noqa: E402
from prepare.inspection import inspect  # noqa: E402
from prepare.recipe import RecipeError, load_recipe  # noqa: E402
from prepare.store import atomic_write  # noqa: E402
from runner.bundle import Bundle, BundleError  # noqa: E402
from runner.checkpoint import CheckpointError  # noqa: E402
from runner.clip import CLIPConfig  # noqa: E402
from runner.clip import tensor_shapes as clip_shapes
from runner.edgetpu_codec import parse_compiled  # noqa: E402
from runner.flatbuf import FormatError  # noqa: E402
from runner.gemma import GemmaConfig  # noqa: E402
from runner.gemma import tensor_shapes as gemma_shapes
from runner.tflite_file import parse_tflite  # noqa: E402

FIXTURES = ROOT.parent / "shared" / "fixtures" / "edgetpu"
RESULTS = ROOT / "bench" / "results"
MEMORY_SLACK = 8 << 20  # bytes any case may use besides its multiple of the input's size
MEMORY_FACTOR = 32


class CaseTimeout(BaseException):
    """Raised in a case by SIGALRM (a BaseException, so no `except Exception` in a parser eats it)."""


# --- mutations ---------------------------------------------------------------------------------

INTERESTING_U32 = [0, 1, 2, 3, 4, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
                   0xFFFFFFFE, 0xFFFFFFFF]


def byte_mutation(data: bytes, rng: np.random.Generator, hot: list[tuple[int, int]] | None = None) -> bytes:
    """Flips, overwrites with interesting 32-bit words (offsets, lengths, vtable sizes), inserted or
    deleted spans, truncation, or random bytes instead; `hot` byte ranges are chosen more often."""
    buf = bytearray(data)
    kind = rng.integers(8)
    if kind == 0 or not buf:
        return rng.bytes(int(rng.integers(0, 2 * len(data) + 16)))
    if kind == 1:
        return bytes(buf[: rng.integers(len(buf))])

    def where() -> int:
        if hot and rng.random() < 0.8:
            lo, hi = hot[rng.integers(len(hot))]
            return int(rng.integers(max(0, lo), max(min(hi, len(buf)), max(0, lo) + 1)))
        return int(rng.integers(len(buf)))

    for _ in range(int(rng.integers(1, 5))):
        if not buf:  # deletions emptied it
            break
        pos = min(where(), len(buf) - 1)
        if kind in (2, 3):
            buf[pos] ^= 1 << int(rng.integers(8)) if kind == 2 else int(rng.integers(1, 256))
        elif kind in (4, 5):  # a little-endian word at a 4-aligned place: flatbuffer offsets live there
            pos -= pos % 4
            value = INTERESTING_U32[rng.integers(len(INTERESTING_U32))] if kind == 4 else \
                (len(buf) + int(rng.integers(-64, 64))) % 2**32
            buf[pos : pos + 4] = int(value).to_bytes(4, "little")
        elif kind == 6:
            buf[pos:pos] = rng.bytes(int(rng.integers(1, 64)))
        else:
            del buf[pos : pos + int(rng.integers(1, 64))]
    return bytes(buf)


HOSTILE_VALUES = [None, True, False, 0, -1, 1, 2**31, 2**63, 10**30, -10**30, 10**400, 0.5, -0.0, 1e308,
                  float("nan"), float("inf"), float("-inf"), "", "x", "\0", "a" * 5000, "../../etc/passwd", "/etc/passwd",
                  "\\\\server\\share", [], [0], [[[[[]]]]], {}, {"": None}, [1, 2, 3], "1e999", "NaN", "\ud800"]


def hostile_value(rng: np.random.Generator, depth: int = 0):
    """A value of any JSON/YAML type, often of the wrong one, sometimes huge or deeply nested."""
    r = rng.random()
    if r < 0.55:  # a copy: mutations append to lists in place, and these are shared across cases
        return copy.deepcopy(HOSTILE_VALUES[rng.integers(len(HOSTILE_VALUES))])
    if r < 0.7:
        return int(rng.integers(-2**62, 2**62)) >> int(rng.integers(0, 62))
    if r < 0.78:
        return float(rng.standard_normal() * 10.0 ** int(rng.integers(-10, 40)))
    if r < 0.85:
        return "".join(chr(int(c)) for c in rng.integers(1, 0x2FF, int(rng.integers(0, 20))))
    if r < 0.9:  # nesting deeper than a parser's recursion limit, written out only in the text
        return f"{DEEP}{int(rng.integers(50, 5000))}{DEEP}"
    if depth > 3:
        return None
    if r < 0.95:
        return [hostile_value(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]
    return {str(hostile_value(rng, depth + 1))[:20]: hostile_value(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))}


DEEP = "@@deep@@"  # "@@deep@@N@@deep@@" in a tree becomes N nested lists in its text


def render_deep(text: str) -> str:
    import re
    return re.sub(f'"{DEEP}(\\d+){DEEP}"', lambda m: "[" * int(m.group(1)) + "]" * int(m.group(1)), text)


def dumps(tree) -> bytes:
    """JSON bytes of a hostile tree: lone surrogates kept, deep-nesting markers expanded."""
    return render_deep(json.dumps(tree)).encode("utf-8", "surrogatepass")


def tree_paths(tree, prefix=()):
    """Every (path, value) in a JSON tree, containers included."""
    yield prefix, tree
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from tree_paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from tree_paths(v, prefix + (i,))


def tree_mutation(tree, rng: np.random.Generator, values=hostile_value):
    """A copy of `tree` with 1-3 nodes replaced, deleted, or given extra keys."""
    tree = json.loads(json.dumps(tree))
    for _ in range(int(rng.integers(1, 4))):
        paths = list(tree_paths(tree))
        path, _ = paths[rng.integers(len(paths))]
        if not path:
            return values(rng)
        parent = tree
        for k in path[:-1]:
            parent = parent[k]
        key, r = path[-1], rng.random()
        if r < 0.15 and isinstance(parent, dict):
            del parent[key]
        elif r < 0.2 and isinstance(parent, dict):
            parent[str(values(rng))[:30]] = values(rng)
        elif r < 0.25 and isinstance(parent, list):
            parent.append(values(rng))
        else:
            parent[key] = values(rng)
    return tree


def json_text(tree, rng: np.random.Generator) -> bytes:
    """The tree as JSON (NaN and Infinity are what Python writes), sometimes byte-mutated."""
    text = dumps(tree)
    return byte_mutation(text, rng) if rng.random() < 0.15 else text


# --- safetensors -------------------------------------------------------------------------------

def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save
    return save(tensors)


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I32", "I64", "BOOL", "F8_E4M3", "C64", "X", ""]


def safetensors_mutation(data: bytes, rng: np.random.Generator) -> bytes:
    """A header that lies: offsets, shapes, dtypes, names, lengths; or NaN/Inf in the data."""
    header, payload = split_safetensors(data)
    names = [k for k in header if k != "__metadata__"]
    kind = rng.integers(10)
    name = names[rng.integers(len(names))]
    spec = header[name]
    if kind == 0:
        begin, end = spec["data_offsets"]
        shift = [1, -1, 4, -4, 10**9, 2**63, -(2**63), len(payload)][rng.integers(8)]
        spec["data_offsets"] = [begin + shift, end + shift] if rng.random() < 0.5 else [begin, end + shift]
    elif kind == 1:
        other = header[names[rng.integers(len(names))]]
        spec["data_offsets"] = list(other["data_offsets"])  # overlap
    elif kind == 2:
        spec["shape"] = [[0], [2**40, 2**40], [-1], [10**12], [1.5], ["2"], [], [2**64]][rng.integers(8)]
    elif kind == 3:
        spec["dtype"] = DTYPES[rng.integers(len(DTYPES))]
    elif kind == 4:
        del header[name]
    elif kind == 5:
        header["__metadata__"] = hostile_value(rng)
    elif kind == 6:  # NaN or Inf in a float tensor's data
        begin, end = spec["data_offsets"]
        if spec["dtype"] == "F32" and end - begin >= 4:
            payload = bytearray(payload)
            at = begin + 4 * int(rng.integers((end - begin) // 4))
            payload[at : at + 4] = np.array([[np.nan, np.inf, -np.inf][rng.integers(3)]], "<f4").tobytes()
            payload = bytes(payload)
    elif kind == 7:
        header = tree_mutation(header, rng)
    body = dumps(header)
    body += b" " * int((-len(body)) % 8)
    length = len(body)
    if kind == 8:
        length = [0, 1, length - 1, length + 1, len(body) + len(payload) + 1, 2**63, 100 << 20][rng.integers(7)]
    out = length.to_bytes(8, "little", signed=False) if length >= 0 else b"\xff" * 8
    out = out + body + payload
    return byte_mutation(out, rng, [(0, 8 + len(body))]) if kind == 9 else out


# --- the parsers -------------------------------------------------------------------------------

class Parser:
    name = ""
    documented: tuple = ()

    def __init__(self, work: Path):
        self.work = work

    def case(self, rng: np.random.Generator) -> int:
        """Write or build one input; return its size in bytes."""
        raise NotImplementedError

    def run(self) -> None:
        raise NotImplementedError

    def reproducer(self, out: Path) -> None:
        """Copy the current case's input(s) to `out`."""
        import shutil
        shutil.copytree(self.work, out, symlinks=True, dirs_exist_ok=True)


def structure_hot(data: bytes) -> list[tuple[int, int]]:
    """Where a TFLite template's offsets, vtables and the DWN1 package live (not the weights)."""
    hot = [(0, 1200), (len(data) - 2000, len(data))]
    at = data.find(b"DWN1")
    while at >= 0:
        hot.append((at - 512, at + 512))
        at = data.find(b"DWN1", at + 1)
    return hot


class TFLite(Parser):
    name, documented = "tflite", (FormatError,)

    def __init__(self, work: Path):
        super().__init__(work)
        self.valid = (FIXTURES / "dense_256.tflite").read_bytes()
        self.hot = structure_hot(self.valid)
        self.path = work / "template.tflite"

    def case(self, rng):
        self.data = byte_mutation(self.valid, rng, self.hot)
        self.path.write_bytes(self.data)
        return len(self.data)

    def run(self):
        inspect(self.path)
        describe(parse_tflite(self.data, self.path))


class EdgeTPU(TFLite):
    name = "edgetpu"

    def __init__(self, work: Path):
        super().__init__(work)
        self.uncompiled = FIXTURES / "dense_256.tflite"
        self.valid = (FIXTURES / "dense_256_edgetpu.tflite").read_bytes()
        self.hot = structure_hot(self.valid)
        self.path = work / "template_edgetpu.tflite"

    def run(self):
        inspect(self.path, self.uncompiled)
        parse_compiled(self.data, self.path).dense_params()


def tiny_clip_config() -> dict:
    tower = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return {"projection_dim": 8, "vision_config": dict(tower, image_size=4, patch_size=2, num_channels=3),
            "text_config": dict(tower, vocab_size=16, max_position_embeddings=8, eos_token_id=15)}


def tiny_gemma_config() -> dict:
    return {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 4, "vocab_size": 16, "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"], "max_position_embeddings": 32,
            "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
            "eos_token_id": [1, 3], "bos_token_id": 2, "pad_token_id": 0, "final_logit_softcapping": None}


def random_tensors(shapes: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


class CheckpointParser(Parser):
    name, documented = "checkpoint", (CheckpointError,)

    def __init__(self, work: Path):
        super().__init__(work)
        rng = np.random.default_rng(0)
        clip, gemma = tiny_clip_config(), tiny_gemma_config()
        self.families = {
            "clip": (clip, safetensors_bytes(random_tensors(clip_shapes(CLIPConfig.from_dict(clip)), rng)), clip_build),
            "gemma": (gemma, safetensors_bytes(random_tensors(gemma_shapes(GemmaConfig.from_dict(gemma)), rng)),
                      gemma_build)}
        (work / "tokenizer.json").write_text("{}")  # present (open_checkpoint checks it exists, not reads it)

    def case(self, rng):
        family = "clip" if rng.random() < 0.5 else "gemma"
        config, tensors, self.module = self.families[family]
        self.recipe = types.SimpleNamespace(checkpoint_dir=self.work, towers=["image", "text"], family=family)
        r = rng.random()
        config_text = json_text(tree_mutation(config, rng), rng) if r < 0.45 else json.dumps(config).encode()
        data = safetensors_mutation(tensors, rng) if 0.45 <= r < 0.9 else \
            byte_mutation(tensors, rng, [(0, 8 + int.from_bytes(tensors[:8], "little"))]) if r >= 0.9 else tensors
        (self.work / "config.json").write_bytes(config_text)
        (self.work / "model.safetensors").write_bytes(data)
        return len(config_text) + len(data)

    def run(self):
        self.module.open_checkpoint(self.recipe)


class RecipeParser(Parser):
    name, documented = "recipe", (RecipeError,)

    def __init__(self, work: Path):
        super().__init__(work)
        checkpoint = work / "ckpt"
        checkpoint.mkdir()
        (checkpoint / "config.json").write_text(json.dumps(tiny_clip_config()))
        (checkpoint / "captions.txt").write_text("a cat\n")
        (work / "templates").mkdir()
        self.valid = [
            {"name": "r", "family": "clip", "checkpoint": str(checkpoint), "towers": ["image", "text"],
             "batch": 2, "batch_per_shape": {"8x16": 4}, "shapes": [[256, 256]], "flavors": ["cpu"],
             "cpu_layers": ["text_model.*"], "quantization": {"weights": "per-channel", "headroom": 0.9,
                                                               "smoothing": 0.5, "activations": "static"},
             "calibration": {"captions": "captions.txt", "synthetic": 2, "max_rows": 64, "seed": 3},
             "verify": {"synthetic": 2, "compare": False}, "target": {"image_cosine_mean": 0.99}},
            {"name": "g", "family": "gemma", "generate": "demo-gemma", "checkpoint": "artifacts/demo/gemma",
             "lm_head": {"tile_rows": 512, "peak_sigmas": 6}, "calibration": {"synthetic": 4},
             "target": {"top1_agreement": 0.9}},
            {"name": "t", "shapes": [[256, 256], [512, 128]], "templates": str(work / "templates"),
             "compiler": "edgetpu_compiler", "compiler_flags": ["-s"], "seed": 1},
        ]
        self.path = work / "recipe.yaml"

    def yaml_value(self, rng):
        """A hostile JSON value, or YAML's own: anchors and aliases, tags, timestamps, sets, binary."""
        if rng.random() < 0.8:
            return hostile_value(rng)
        return YamlSource(["*x", "&x [1, *x]", "!!binary 'AAA='", "!!timestamp 2001-13-45", "!!set {a, b}",
                           "!!python/object:os.system {}", "!!float 'x'", "2001-12-14t21:59:43.10-05:00",
                           "0x" + "f" * 40, "1_000", ".inf", "~", "|\n  block", "? complex", "{a: [b, {c: d}]}",
                           "!!omap [a: 1]", "'unterminated"][rng.integers(17)])

    def case(self, rng):
        tree = self.valid[rng.integers(len(self.valid))]
        r = rng.random()
        if r < 0.75:
            text = yaml_dump(tree_mutation(tree, rng, self.yaml_value)).encode("utf-8", "surrogatepass")
        else:
            text = byte_mutation(yaml_dump(tree).encode(), rng)
        self.path.write_bytes(text)
        return len(text)

    def run(self):
        load_recipe(self.path)


class YamlSource(str):
    """Written into the YAML text as it is (not quoted): anchors, aliases, tags."""


def yaml_dump(tree, indent: str = "") -> str:
    """Block YAML, with `YamlSource` strings unquoted (yaml.safe_dump would quote them)."""
    if isinstance(tree, YamlSource):
        return str(tree)
    if isinstance(tree, dict) and tree:
        return "".join(f"\n{indent}{json.dumps(str(k))}: {yaml_dump(v, indent + '  ')}" for k, v in tree.items())
    if isinstance(tree, list) and tree and len(tree) < 50:
        return "".join(f"\n{indent}- {yaml_dump(v, indent + '  ')}" for v in tree)
    return render_deep(json.dumps(tree))  # JSON is YAML (flow style), NaN aside: PyYAML reads .nan, not NaN


class ManifestParser(Parser):
    name, documented = "manifest", (BundleError,)

    def __init__(self, work: Path):
        super().__init__(work)
        self.bundle = work / "bundle"
        (self.bundle / "layers").mkdir(parents=True)
        rng = np.random.default_rng(0)
        config = tiny_gemma_config()
        self.host = safetensors_bytes({"model.norm.weight": np.ones(8, np.float32),
                                       "model.embed_tokens.weight_int8": np.ones((16, 8), np.int8)})
        (self.bundle / "host.safetensors").write_bytes(self.host)
        (self.bundle / "tokenizer.json").write_text("{}")
        files = {}
        for name in ("a", "b", "t0", "t1"):
            blob = rng.bytes(8 * 8 + 64)
            (self.bundle / "layers" / f"{name}.params.bin").write_bytes(blob)
            files[name] = {"params": {"path": f"layers/{name}.params.bin", "sha256": "0" * 64, "bytes": len(blob)}}
        (self.bundle / "out").symlink_to("/etc/passwd")  # a symlink leading out of the bundle
        (self.bundle / "loop").symlink_to("loop")  # and one leading nowhere

        def tpu(name, n_out=8):
            return {"name": name, "in": 8, "out": n_out, "placement": "tpu", "batch": 1, "zp_in": 128,
                    "zp_out": 127, "files": files[name]}
        self.valid = {
            "format": "coral-bundle", "version": 1, "name": "g", "family": "gemma", "towers": ["decoder"],
            "config": config,
            "host": {"path": "host.safetensors", "sha256": "0" * 64, "bytes": len(self.host)},
            "tokenizer": {"path": "tokenizer.json", "sha256": "0" * 64, "bytes": 2},
            "layers": [tpu("a"), dict(tpu("b"), input_scale=0.5),
                       {"name": "h", "in": 8, "out": 8, "placement": "host"}],
            "lm_head": {"tile_rows": 8, "vocab_size": 16,
                        "tiles": [dict(tpu("t0"), rows=[0, 8]), dict(tpu("t1"), rows=[8, 16])]}}

    def path_value(self, rng):
        if rng.random() < 0.5:
            return hostile_value(rng)
        return ["/etc/passwd", "../manifest.json", "layers/../../x", "out", "loop", "loop/x", "layers/a.params.bin\0",
                "", ".", "layers", "a" * 300, "layers/" + "b" * 5000, "\\..\\x", "./host.safetensors", "C:/x",
                "//etc/passwd", "layers/a.params.bin/"][rng.integers(17)]

    def case(self, rng):
        r = rng.random()
        host = self.host
        if r < 0.2:  # hostile paths in file entries
            manifest = json.loads(json.dumps(self.valid))
            entries = [manifest["host"], manifest["tokenizer"]] + \
                [f["params"] for f in (manifest["layers"][0]["files"], manifest["lm_head"]["tiles"][1]["files"])]
            entries[rng.integers(len(entries))]["path"] = self.path_value(rng)
            text = json_text(manifest, rng)
        elif r < 0.7:
            text = json_text(tree_mutation(self.valid, rng), rng)
        elif r < 0.85:
            text, host = json.dumps(self.valid).encode(), safetensors_mutation(self.host, rng)
        else:
            text = byte_mutation(json.dumps(self.valid).encode(), rng)
        if host is not self.host:
            text = text.replace(b'"bytes": %d' % len(self.host), b'"bytes": %d' % len(host), 1)
        (self.bundle / "manifest.json").write_bytes(text)
        (self.bundle / "host.safetensors").write_bytes(host)
        return len(text) + len(host)

    def run(self):
        Bundle.open(self.bundle).model_config()


PARSERS = {p.name: p for p in (TFLite, EdgeTPU, CheckpointParser, RecipeParser, ManifestParser)}


# --- the loop ----------------------------------------------------------------------------------

def fuzz(parser_class, cases: int, seed: int, time_limit_ms: int, memory_every: int, log=print) -> dict:
    rng = np.random.default_rng([seed, sorted(PARSERS).index(parser_class.name)])
    undocumented: dict[str, dict] = {}
    hangs, outcomes = [], {"accepted": 0, "documented": 0, "undocumented": 0, "hang": 0}
    slowest = (0.0, None)
    memory = {"cases": 0, "peak_bytes": 0, "peak_input_bytes": 0, "worst_ratio": 0.0, "over_limit": 0}
    started = time.perf_counter()

    def alarm(signum, frame):
        raise CaseTimeout()
    signal.signal(signal.SIGALRM, alarm)
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{parser_class.name}-") as tmp:
        parser = parser_class(Path(tmp))
        for k in range(cases):
            size = parser.case(rng)
            traced = memory_every and k % memory_every == 0
            if traced:
                tracemalloc.start()
            t0 = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, time_limit_ms / 1e3)
            try:
                parser.run()
                outcome = "accepted"
            except parser.documented as e:
                outcome = "documented"
                error = e
            except CaseTimeout:
                outcome = "hang"
            except Exception as e:  # noqa: BLE001 - counting what is not documented is the point
                outcome, error = "undocumented", e
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            ms = (time.perf_counter() - t0) * 1e3
            if traced:
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                memory["cases"] += 1
                if peak > memory["peak_bytes"]:
                    memory["peak_bytes"], memory["peak_input_bytes"] = peak, size
                memory["worst_ratio"] = max(memory["worst_ratio"], (peak - MEMORY_SLACK) / max(size, 1))
                memory["over_limit"] += peak > MEMORY_SLACK + MEMORY_FACTOR * size
            outcomes[outcome] += 1
            if ms > slowest[0]:
                slowest = (ms, k)
            if outcome == "hang" and len(hangs) < 5:
                hangs.append(k)
                parser.reproducer(RESULTS / "fuzz-cases" / parser.name / f"hang-{k}")
            if outcome == "undocumented":
                frame = traceback.extract_tb(error.__traceback__)[-1]
                key = f"{type(error).__name__} at {Path(frame.filename).name}:{frame.lineno}"
                seen = undocumented.setdefault(key, {"count": 0, "first_case": k, "message": str(error)[:300]})
                seen["count"] += 1
                if seen["count"] == 1:
                    log(f"  case {k}: undocumented {key}: {str(error)[:200]}")
                    parser.reproducer(RESULTS / "fuzz-cases" / parser.name / f"case-{k}")
            elif outcome == "documented" and not _names_input(str(error), parser):
                key = "documented error without the file's name"
                seen = undocumented.setdefault(key, {"count": 0, "first_case": k, "message": str(error)[:300]})
                seen["count"] += 1
                outcomes["documented"] -= 1
                outcomes["undocumented"] += 1
            if (k + 1) % 10000 == 0:
                log(f"  {parser.name}: {k + 1} cases, {outcomes}, {time.perf_counter() - started:.0f} s")
    return {"parser": parser_class.name, "documented_errors": [e.__name__ for e in parser_class.documented],
            "cases": cases, "seed": seed, "outcomes": outcomes, "undocumented": undocumented,
            "hangs": hangs, "time_limit_ms": time_limit_ms, "slowest_case_ms": round(slowest[0], 2),
            "slowest_case": slowest[1], "memory": {**memory, "limit": f"{MEMORY_SLACK} + {MEMORY_FACTOR} x input bytes"},
            "seconds": round(time.perf_counter() - started, 1)}


def _names_input(message: str, parser: Parser) -> bool:
    """A documented error must name the file (or bundle, checkpoint, recipe) it is about."""
    return str(parser.work) in message


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parser", choices=["all", *PARSERS], default="all")
    ap.add_argument("--cases", type=int, default=100000, help="cases per parser")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--time-limit-ms", type=int, default=2000, help="a case running longer is a hang")
    ap.add_argument("--memory-every", type=int, default=10, help="trace memory of every Nth case (0: none)")
    ap.add_argument("--out", type=Path, default=RESULTS / f"fuzz-{datetime.date.today().isoformat()}.json")
    args = ap.parse_args(argv)
    if not (FIXTURES / "dense_256_edgetpu.tflite").is_file() and args.parser in ("all", "tflite", "edgetpu"):
        print(f"the real templates are not at {FIXTURES}; run --parser checkpoint|recipe|manifest", file=sys.stderr)
        return 2
    sys.setrecursionlimit(1000)  # the interpreter's default, as the project runs
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"parsers": {}}
    failed = False
    for name in (PARSERS if args.parser == "all" else [args.parser]):
        print(f"{name}: {args.cases} cases", flush=True)
        r = fuzz(PARSERS[name], args.cases, args.seed, args.time_limit_ms, args.memory_every,
                 log=lambda s: print(s, flush=True))
        failed |= bool(r["undocumented"] or r["hangs"] or r["memory"]["over_limit"])
        print(f"{name}: {r['outcomes']}, slowest {r['slowest_case_ms']} ms, traced peak "
              f"{r['memory']['peak_bytes'] / 2**20:.1f} MiB, {r['seconds']} s", flush=True)
        results["parsers"][name] = r
        results.update(date=datetime.date.today().isoformat(), python=sys.version.split()[0],
                       peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
        atomic_write(args.out, json.dumps(results, indent=1, default=_json_default))
    return 1 if failed else 0


def _json_default(o):
    return None if isinstance(o, float) and not math.isfinite(o) else str(o)


if __name__ == "__main__":
    sys.exit(main())
