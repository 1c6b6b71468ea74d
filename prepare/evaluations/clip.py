"""How a CLIP bundle is evaluated on held-out inputs (the recipe's `verify`): the cosine of
the normalized image and text embeddings (mean, min), float against int8, and zero-shot
agreement, each image's best text among the held-out texts; with `verify.labels`, zero-shot
top-1 and text-to-image recall at 1 against what each image shows.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from runner.clip import CLIP, tower_of
from runner.files import read_json
from runner.nn import Linear, float_linear

from ..evaluate import cosines, normalize
from ..families import clip
from ..recipe import Recipe, RecipeError

EVALUATION_BATCH = 8
MAX_LABELS_BYTES = 16 << 20  # a labels file of a verify image set


class Evaluation:
    """Held-out images and texts, and the float model's embeddings of them; with the recipe's
    `verify.labels`, what each image shows and the candidate labels a user would ask about.
    Another contrastive family (SigLIP) evaluates the same way with its own model and texts."""

    model_class = CLIP
    calibration_texts = staticmethod(clip.calibration_texts)
    tokenizer_for = staticmethod(clip.tokenizer_for)

    def __init__(self, recipe: Recipe, config, weights: Mapping[str, np.ndarray]):
        self.config, self.towers = config, recipe.towers
        # What the sensitivity ranks by: the recipe's towers' mean cosines.
        self.sensitivity_keys = tuple(f"{tower}_cosine_mean" for tower in clip.TOWERS if tower in self.towers)
        self.pixels = clip.calibration_images(recipe, config, "verify") if "image" in self.towers else None
        self.texts = self.calibration_texts(recipe, config, "verify") if "text" in self.towers else None
        self.truth, self.label_texts = None, None  # index of each labelled image's label among the candidates
        if recipe.verify.labels is not None and len(self.towers) == 2:
            names = [p.name for p in clip.image_files(recipe, "verify")]
            candidates, self.truth = read_labels(recipe, names)
            tokenizer = self.tokenizer_for(recipe.checkpoint_dir, config)
            self.label_texts = [tokenizer([c])[0] for c in candidates]
            self.candidates = candidates
        self.reference = self.outputs(weights, float_linear(weights))

    @property
    def primary(self) -> tuple[str, ...]:
        """What the curve and the comparisons show: the answers a user gets where there are labels."""
        return self.sensitivity_keys + (("zero_shot_agreement",) if self.truth is not None else ())

    def outputs(self, weights, linear: Linear, towers=None) -> dict[str, np.ndarray]:
        """Normalized embeddings of the towers asked for (default: the recipe's): images, held-out
        texts and, with labels, the candidate labels."""
        model, out = self.model_class(self.config, weights, linear), {}
        towers = self.towers if towers is None else towers
        if "image" in towers:
            out["image"] = normalize(np.concatenate([model.image_features(self.pixels[k : k + EVALUATION_BATCH])
                                                      for k in range(0, len(self.pixels), EVALUATION_BATCH)]))
        if "text" in towers:
            out["text"] = normalize(self._text_features(model, self.texts))
            if self.label_texts is not None:
                out["labels"] = normalize(self._text_features(model, self.label_texts))
        return out

    def _text_features(self, model: CLIP, texts: list[np.ndarray]) -> np.ndarray:
        """Texts in batches of similar length, each padded with its own end-of-text id: the
        causal mask keeps padding out of every real position, and pooling takes the first
        end-of-text, so each embedding is the one the text alone would give."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.config.projection_dim), np.float32)
        for k in range(0, len(order), EVALUATION_BATCH):
            chunk = order[k : k + EVALUATION_BATCH]
            n = max(len(texts[i]) for i in chunk)
            ids = np.stack([np.pad(texts[i], (0, n - len(texts[i])), constant_values=texts[i][-1]) for i in chunk])
            out[chunk] = model.text_features(ids)
        return out

    def metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        """Scores of `outputs` (towers not in it count as float's own)."""
        out, ref = {**self.reference, **outputs}, self.reference
        m = {}
        for tower in self.towers:
            c = cosines(out[tower], ref[tower])
            m[f"{tower}_cosine_mean"], m[f"{tower}_cosine_min"] = float(c.mean()), float(c.min())
        if self.truth is not None:
            labelled = self.truth >= 0
            guess, float_guess = self._zero_shot(out)[labelled], self._zero_shot(ref)[labelled]
            truth = self.truth[labelled]
            m["zero_shot_top1_float"] = float(np.mean(float_guess == truth))
            m["zero_shot_top1_int8"] = float(np.mean(guess == truth))
            m["zero_shot_agreement"] = float(np.mean(guess == float_guess))
            m["recall_at_1_float"], m["recall_at_1_int8"] = self._recall_at_1(ref), self._recall_at_1(out)
        elif len(self.towers) == 2:
            best = (out["image"] @ out["text"].T).argmax(1)
            m["zero_shot_agreement"] = float(np.mean(best == (ref["image"] @ ref["text"].T).argmax(1)))
        return m

    def _zero_shot(self, out: dict[str, np.ndarray]) -> np.ndarray:
        """Each image's best candidate label."""
        return (out["image"] @ out["labels"].T).argmax(1)

    def _recall_at_1(self, out: dict[str, np.ndarray]) -> float:
        """Text to image: for each candidate label some image shows, whether the image it ranks
        first is one that shows it."""
        labelled = np.flatnonzero(self.truth >= 0)
        queries = sorted(set(self.truth[labelled].tolist()))
        best = labelled[(out["labels"][queries] @ out["image"][labelled].T).argmax(1)]
        return float(np.mean(self.truth[best] == np.array(queries)))

    def score(self, weights, linear: Linear, towers=None) -> dict[str, float]:
        return self.metrics(self.outputs(weights, linear, towers))

    def sensitivity_metrics(self, weights, linear: Linear, layer: str) -> dict[str, float]:
        """The metrics with `layer` changed: only its tower is rerun."""
        return self.score(weights, linear, towers=[tower_of(layer)])

    def bundle_metrics(self, bundle, linear: Linear, recipe: Recipe, checkpoint, config) -> dict[str, float]:
        """The metrics of a bundle's int8 path (`linear` runs its layers; its host tensors are the rest)."""
        return self.metrics(self.outputs(bundle.host, linear))

    def inputs_summary(self) -> dict:
        out = {"images": 0 if self.pixels is None else len(self.pixels),
               "texts": 0 if self.texts is None else len(self.texts)}
        if self.truth is not None:
            out.update(labelled_images=int(np.sum(self.truth >= 0)), candidates=len(self.label_texts))
        return out


def read_labels(recipe: Recipe, names: list[str]) -> tuple[list[str], np.ndarray]:
    """(candidate labels, each image's label index or -1) from `verify.labels`, a JSON object
    mapping an image's file name to its label or to {"label": ...}."""
    path = recipe.input_path("verify", "labels")
    where = f"{recipe.source}: key verify.labels: {path}"
    table = read_json(path, RecipeError, MAX_LABELS_BYTES)
    if not isinstance(table, dict):
        raise RecipeError(f"{where}: expected a JSON object mapping image file names to labels")
    labels = {}
    for name, value in table.items():
        label = value.get("label") if isinstance(value, dict) else value
        if not isinstance(label, str) or not label.strip():
            raise RecipeError(f"{where}: the label of {name!r} must be a non-empty string")
        labels[name] = label.strip()
    if not set(names) & set(labels):
        raise RecipeError(f"{where}: names none of the verify images in {recipe.input_path('verify', 'images')}")
    candidates = list(recipe.verify.candidates or sorted(set(labels.values())))
    unknown = sorted({labels[n] for n in names if n in labels} - set(candidates))
    if unknown:
        raise RecipeError(f"{recipe.source}: key verify.candidates lacks labels the images have: {unknown[:5]}")
    return candidates, np.array([candidates.index(labels[n]) if n in labels else -1 for n in names]
                                + [-1] * recipe.verify.synthetic)
