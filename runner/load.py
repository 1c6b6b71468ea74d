"""Start-up, for either family: open a bundle and build its model on a backend.

Everything a command does before its first input: read and check the manifest (its
`family` chooses the model, as mlx-lm's `load` reads `model_type`), memory-map the host tensors, and make
the model's executor on the backend (runner/executors.py). Nothing is quantized, patched
or decoded here: each layer decodes its parameters or opens its interpreter on first use.
A decoder (runner/families.py) also gets its LM head in the mode asked for
(runner/lm_head.py) and the bundle's tokenizer.

The fp32 backend runs the float checkpoint instead (`--checkpoint DIR`: bundles carry no
float weights for the layers that run on the TPU), its tensors checked against the shapes
the bundle's config implies before the model is built.

`auto` (the command line's default) is the best backend this machine runs the bundle on:
`edgetpu` where the bundle has its artifacts and a Coral answers, else `cpu` where it has
its artifacts and a TFLite interpreter is installed, else `emulate` (numpy only).
`Loaded.backend` is the one chosen and `Loaded.why` what ruled out the better ones.

The route (runner/executors.py `make_linear`) says where a TPU layer's calls go. Without
one asked for, a bundle with routes (built with both the edgetpu and the cpu flavor) runs
`auto` on the edgetpu backend: each call to the TPU or to the cpu flavor by its rows, as
the build's cost model says is cheaper. Every other run keeps to its backend (`cpu` on the
cpu backend, `tpu` on emulate, which stands for the TPU: there `--route auto` routes as it
would on the device).
`Loaded.routes` counts where the calls went.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .bundle import Bundle, BundleError, Manifest, read_manifest
from .checkpoint import Checkpoint
from .clip import CLIP
from .executors import FLAVOR, BackendError, Routes, edgetpu_delegates, make_linear
from .families import FAMILIES, Family
from .gemma import Gemma, GemmaConfig
from .interpreter import require_interpreter
from .lm_head import CpuHead, FloatHead, Int8Table, TileHead, make_head
from .nn import float_linear
from .packages import MissingPackageError
from .tokenizer import GemmaTokenizer


@dataclass
class Loaded:
    """What start-up gives a command."""

    bundle: Bundle
    family: Family  # the manifest's
    model: CLIP | Gemma
    backend: str  # the one it runs on (`auto` chooses one)
    head: CpuHead | TileHead | FloatHead | None = None  # a decoder's LM head
    tokenizer: GemmaTokenizer | None = None  # a decoder's, when the bundle has one
    why: str | None = None  # with `auto`: why not a better backend
    routes: Routes | None = None  # where the linear calls went (not on fp32)

    def auto_line(self) -> str:
        """What a command asked for `--backend auto` says on stderr: the choice, and why not a better one."""
        return f"backend: {self.backend} (--backend auto{'; not ' + self.why if self.why else ''})"

    def require(self, family: Family, use: str) -> None:
        """Refuse, in one line, a bundle of another family than `use` (what a command does) needs."""
        if self.family is not family:
            raise BundleError(f"{self.bundle.dir}: a {self.family.title} bundle; {use} needs a {family.title} one")


def load(bundle_dir: str | Path, backend: str = "auto", checkpoint: str | Path | None = None, *,
         lm_head: str = "cpu", capacity: int | None = None, shortlist: int | None = None,
         rescore: int | None = None, route: str | None = None) -> Loaded:
    """Open the bundle and build its model, of the family its manifest names, on `backend`;
    for a decoder also the LM head (`lm_head` mode, with the tpu heads' `capacity`,
    `shortlist`, `rescore`) and the tokenizer. `checkpoint` is the float model directory the
    fp32 backend runs; `auto` chooses the backend, and `route` None the route (see the
    module docstring). The manifest is read and checked once."""
    manifest = read_manifest(bundle_dir)
    why, delegates = None, None
    if backend == "auto":
        backend, why, delegates = choose_backend(manifest)
    bundle = Bundle.open(bundle_dir, FLAVOR.get(backend, backend), manifest)  # fp32 opens no layer file
    family = FAMILIES[bundle.family]  # read_manifest refused a family the runner does not know
    config = bundle.model_config()
    tokenizer = None
    if family.decoder and bundle.tokenizer is not None:
        tokenizer = GemmaTokenizer(bundle.tokenizer.path, config.bos_token_id)
    if backend == "fp32":
        weights = float_checkpoint(checkpoint, family.tensor_shapes(config, bundle.towers))
        head = FloatHead(weights, config.vocab_size) if family.decoder else None
        return Loaded(bundle, family, family.model_class(config, weights, float_linear(weights)), backend, head,
                      tokenizer)
    if backend == "edgetpu" and delegates is None:
        delegates = edgetpu_delegates()  # one for every layer, and a decoder's head
    if route is None:  # the cpu backend runs every call on the cpu flavor: its route says so
        route = "auto" if backend == "edgetpu" and bundle.manifest.get("route") else "cpu" if backend == "cpu" else "tpu"
    routes = Routes(route)
    linear = make_linear(bundle, backend, delegates, route, routes)
    if not family.decoder:
        return Loaded(bundle, family, family.model_class(config, bundle.host, linear), backend, why=why, routes=routes)
    head, table = make_head(bundle, backend, lm_head, capacity, shortlist, rescore, delegates)
    check_head_fits(bundle, config, table)
    model = family.model_class(config, bundle.host, linear, embed=table.embed)
    return Loaded(bundle, family, model, backend, head, tokenizer, why, routes)


def describe(bundle_dir: str | Path) -> Loaded:
    """The bundle as a process that never runs its model sees it: the server's HTTP process
    (runner/serve/worker.py), which checks requests, tokenizes, renders chat templates and
    parses answers while the engine process runs the model. The manifest, config and
    tokenizer, and a model whose linears refuse to run; no layer file is opened, nothing is
    decoded. Its backend is "none"."""
    manifest = read_manifest(bundle_dir)
    bundle = Bundle.open(bundle_dir, FLAVOR.get("fp32", "fp32"), manifest)  # no layer file, as fp32
    family = FAMILIES[bundle.family]
    config = bundle.model_config()
    tokenizer = None
    if family.decoder and bundle.tokenizer is not None:
        tokenizer = GemmaTokenizer(bundle.tokenizer.path, config.bos_token_id)

    def not_here(name: str, x):
        raise RuntimeError(f"{name}: this process describes the model; the engine process runs it")
    return Loaded(bundle, family, family.model_class(config, bundle.host, not_here), "none", tokenizer=tokenizer)


def choose_backend(manifest: Manifest) -> tuple[str, str, list | None]:
    """(backend, why not the better ones, the Edge TPU delegates when it is edgetpu)."""
    layers = manifest.tpu_layers
    ruled_out = []
    if not all("edgetpu" in layer.files for layer in layers):
        ruled_out.append("edgetpu: the bundle has no edgetpu artifacts")
    else:
        try:
            return "edgetpu", "", edgetpu_delegates()
        except (BackendError, MissingPackageError) as e:
            ruled_out.append(f"edgetpu: {e}")
    if not all("cpu" in layer.files for layer in layers):
        ruled_out.append("cpu: the bundle has no cpu artifacts")
    else:
        try:
            require_interpreter()
            return "cpu", "; ".join(ruled_out), None
        except MissingPackageError as e:
            ruled_out.append(f"cpu: {e}")
    return "emulate", "; ".join(ruled_out), None


def float_checkpoint(directory: str | Path | None, shapes: dict[str, tuple[int, ...]]) -> Checkpoint:
    """The checkpoint the fp32 backend runs, with every tensor in `shapes` checked."""
    if directory is None:
        raise BackendError("--backend fp32 needs --checkpoint DIR (the float model; bundles carry "
                           "no float weights for layers that run on the TPU)")
    weights = Checkpoint(directory)
    weights.require(shapes)
    return weights


def check_head_fits(bundle: Bundle, config: GemmaConfig, table: Int8Table) -> None:
    """The int8 embedding table and the LM-head tiles cover the vocabulary at the hidden size the config says."""
    if table.q.shape != (config.vocab_size, config.hidden_size):
        raise BundleError(f"{bundle.host.path}: the int8 embedding is {list(table.q.shape)}, the config says "
                          f"[{config.vocab_size}, {config.hidden_size}]")
    head_shape = bundle.lm_head and (bundle.lm_head.vocab_size, bundle.lm_head.tiles[0].n_in)
    if head_shape and head_shape != (config.vocab_size, config.hidden_size):
        raise BundleError(f"{bundle.dir / 'manifest.json'}: lm_head covers {head_shape[0]} tokens of width "
                          f"{head_shape[1]}, the config says {config.vocab_size} of {config.hidden_size}")
