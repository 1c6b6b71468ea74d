"""The use cases of a contrastive bundle (CLIP's or SigLIP's image and text towers):
embeddings and zero-shot labels.

One implementation for everyone who asks: `runner clip-image`, `clip-text`, `zero-shot`,
`index` and `search`, and the server's embeddings, classify and search endpoints
(runner/serve/), for any contrastive family (runner/families.py) without naming one. What a
family does its own way stays in its model and its family: how an image becomes pixels (the
config's `processing`), how texts become ids (the family's `tokenizer`), how two embeddings
become a probability (`label_probabilities`: CLIP's softmax over the labels, SigLIP's sigmoid
of each).

Embeddings come out as the model computes them or, with `unit=True`, scaled to length 1
(`unit_rows`: what cosine similarity, search and zero-shot use; what the server returns).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np

from .bundle import BundleError
from .errors import UserError
from .families import CONTRASTIVE
from .images import ImageProcessing, load_f32le, load_image
from .load import Loaded

LABEL_CACHE = 4096  # label embeddings kept (per template and label): 2 MiB at 512 floats


class LabelError(UserError):
    """Zero-shot labels or a label template that cannot be used."""


def check_template(template: str) -> str:
    """A label template ("a photo of {}"): one {} where the label goes, as str.format fills it."""
    try:
        template.format("label")
    except (AttributeError, IndexError, KeyError, ValueError) as e:  # what str.format raises
        raise LabelError(f"{template!r} is not a template with one {{}} where the label goes ({e})") from None
    if "{}" not in template:
        raise LabelError(f"{template!r} needs a {{}} where the label goes")
    return template


def check_labels(labels: list[str]) -> list[str]:
    """Labels for zero-shot: each once (a repeated one splits its probability, and answers keyed
    by label lose one of them)."""
    label, n = Counter(labels).most_common(1)[0] if labels else (None, 0)
    if n > 1:
        raise LabelError(f"the label {label!r} is given {n} times")
    return labels


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1 (an all-zero row stays zero)."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1)


class Contrastive:
    """A loaded contrastive bundle's towers, with the tokenizer opened on first use (an
    image-only run needs no tokenizers package) and the label embeddings zero-shot made,
    kept per (template, label) up to `label_cache` of them."""

    def __init__(self, loaded: Loaded, label_cache: int = LABEL_CACHE):
        if not loaded.family.contrastive:
            raise BundleError(f"{loaded.bundle.dir}: a {loaded.family.title} bundle; embedding images and texts "
                              f"needs a {CONTRASTIVE} one")
        self.loaded, self.model, self.config = loaded, loaded.model, loaded.model.config
        self.label_cache = label_cache  # label embeddings kept at most (0: none, every call encodes its labels)
        self._tokenizer = None
        self._labels: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @property
    def processing(self) -> ImageProcessing:
        """How an image file becomes the image tower's pixels (the checkpoint's processor)."""
        return self.config.processing

    def require_tower(self, tower: str) -> None:
        bundle = self.loaded.bundle
        if tower not in bundle.towers or (tower == "text" and bundle.tokenizer is None):
            raise BundleError(f"{bundle.dir}: built without the {tower} tower (towers: {', '.join(bundle.towers)})")

    def tokenizer(self):
        """The text tower's tokenizer (the family's), opened on first use."""
        self.require_tower("text")
        if self._tokenizer is None:
            self._tokenizer = self.loaded.family.tokenizer(self.loaded.bundle.tokenizer.path, self.config)
        return self._tokenizer

    def tokenize(self, texts: list[str]) -> np.ndarray:
        """int64 [len(texts), L] token ids, as the text tower takes them (CLIP: L the longest
        text's; SigLIP: its context)."""
        return self.tokenizer()(texts)

    @property
    def pad_id(self) -> int:
        """The token `tokenize` pads rows with (CLIP's end-of-text; SigLIP's pad)."""
        return self.tokenizer().pad_id

    def read_images(self, files: list[str | Path], f32le: bool = False) -> np.ndarray:
        """Image files as the image tower's pixels [n, 3, S, S] (`f32le`: raw float32 files,
        already normalized)."""
        self.require_tower("image")
        if f32le:
            return np.stack([load_f32le(f, self.image_size) for f in files])
        return np.stack([load_image(f, self.processing) for f in files])

    def image_embeddings(self, pixels: np.ndarray, unit: bool = False) -> np.ndarray:
        self.require_tower("image")
        out = self.model.image_features(pixels)
        return unit_rows(out) if unit else out

    def text_embeddings(self, texts: list[str], unit: bool = False) -> np.ndarray:
        return self.token_embeddings(self.tokenize(texts), unit)

    def token_embeddings(self, ids: np.ndarray, unit: bool = False) -> np.ndarray:
        """Texts already tokenized (`tokenize`): a caller that times the model alone."""
        out = self.model.text_features(ids)
        return unit_rows(out) if unit else out

    def label_embeddings(self, labels: list[str], template: str = "{}") -> np.ndarray:
        """Unit text embeddings of `template` filled with each label; each encoded once and kept."""
        missing = [label for label in dict.fromkeys(labels) if (template, label) not in self._labels]
        if missing:
            for label, e in zip(missing, self.text_embeddings([template.format(m) for m in missing], unit=True)):
                self._labels[(template, label)] = e
        out = np.stack([self._labels[(template, label)] for label in labels])
        for label in labels:
            self._labels.move_to_end((template, label))
        while len(self._labels) > self.label_cache:
            self._labels.popitem(last=False)
        return out

    def zero_shot(self, pixels: np.ndarray, labels: list[str], template: str = "{}") -> np.ndarray:
        """Each image's probabilities over `labels` [n, len(labels)]."""
        images = self.image_embeddings(pixels, unit=True)
        return self.model.label_probabilities(images, self.label_embeddings(labels, template))
