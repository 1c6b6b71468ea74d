"""Images in, model pixels out: what a Hugging Face image processor does, with Pillow.

`ImageProcessing` says how, as the checkpoint's `preprocessor_config.json` does: CLIP's
resizes so the shortest side is `size` and center crops `size` x `size`; SigLIP's resizes
both sides to `size`. Then scale to [0, 1], normalize with the model's mean and std,
channels first. Any Pillow mode is converted to RGB first: grayscale, palette, RGBA
(alpha dropped, as the processors do) and 16-bit images. Raw float32 CHW files, already
normalized, are read as they are (`--image-f32le`, as the reference project).

Pillow is an optional dependency (the runner extra), imported where it is used: text
inputs and raw float32 files run without it. Large files are decoded within MAX_PIXELS
(`load_image`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from .config_values import ConfigError, ConfigFields
from .errors import UserError
from .packages import require

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
RESAMPLE = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC"}  # PIL's numbering, as processors write it


@dataclass(frozen=True)
class ImageProcessing:
    """How a model's image processor makes its pixels [3, size, size]."""
    size: int
    crop: bool = True  # shortest side to `size`, then a center crop (CLIP); False: both sides to `size` (SigLIP)
    mean: tuple[float, ...] = tuple(CLIP_MEAN.tolist())
    std: tuple[float, ...] = tuple(CLIP_STD.tolist())
    resample: int = 3  # bicubic

    @classmethod
    def from_dict(cls, d: Mapping, size: int, default: "ImageProcessing") -> "ImageProcessing":
        """The keys of a `preprocessor_config.json` the runner uses (`image_mean`, `image_std`,
        `resample`, `do_center_crop`), checked; what is absent is `default`'s. The model's
        `image_size` is the pixels' size: a processor that disagrees is a ConfigError."""
        f = ConfigFields(d, "preprocessor")
        crop = f.raw("do_center_crop", default.crop)
        if not isinstance(crop, bool):
            raise ConfigError(f"config key {f.name('do_center_crop')!r} must be true or false, got {crop!r}")
        mean, std = (_triple(f, key, fallback) for key, fallback in (("image_mean", default.mean),
                                                                       ("image_std", default.std)))
        if min(std) <= 0:
            raise ConfigError(f"config key {f.name('image_std')!r} must be positive, got {list(std)}")
        resample = f.integer("resample", default.resample, low=0, high=3)
        out = f.raw("crop_size" if crop else "size", None)
        sides = out.values() if isinstance(out, Mapping) else [out] if out is not None else []
        if any(side != size for side in sides):
            raise ConfigError(f"config key {f.name('crop_size' if crop else 'size')!r} is {out!r}, but the model "
                              f"takes images of {size} x {size}")
        return cls(size, crop, mean, std, resample)


def _triple(f: ConfigFields, key: str, default: tuple[float, ...]) -> tuple[float, ...]:
    value = f.raw(key, default)
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in value)):
        raise ConfigError(f"config key {f.name(key)!r} must be three numbers, got {value!r}")
    return tuple(float(v) for v in value)


def clip_processing(size: int) -> ImageProcessing:
    return ImageProcessing(size)


class ImageError(UserError):
    """An image that cannot be used; the message names the file."""


# The image files the project reads, by name (Pillow reads each): photo search's directory
# scan and a recipe's image folders (calibration, verify) both take these.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
MAX_PIXELS = 1 << 26  # 64 Mi pixels (8192 x 8192): 192 MiB as 8-bit RGB


def pillow():
    """Pillow's Image module (optional: see the module docstring)."""
    return require("PIL.Image", "it reads images")


def to_rgb(img):
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16- and 32-bit integer grayscale: scale the used range to 8 bits, then RGB.
        a = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
        img = pillow().fromarray(np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return img.convert("RGB")


def preprocess(img, processing: ImageProcessing | int) -> np.ndarray:
    """A Pillow image -> float32 [3, size, size], as the model's image processor (an int:
    CLIPImageProcessor at that size)."""
    p = clip_processing(processing) if isinstance(processing, int) else processing
    size, img = p.size, to_rgb(img)
    w, h = img.size
    if p.crop:
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    else:
        new_w, new_h = size, size
    resample = getattr(pillow().Resampling, RESAMPLE[p.resample])
    img = img.resize((new_w, new_h), resample=resample, reducing_gap=None)
    a = np.asarray(img, dtype=np.float32)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    a = a[top : top + size, left : left + size] / 255.0
    mean, std = np.array(p.mean, np.float32), np.array(p.std, np.float32)
    return ((a - mean) / std).transpose(2, 0, 1).astype(np.float32)


def normalize(pixels01: np.ndarray, processing: ImageProcessing) -> np.ndarray:
    """Pixels [3, S, S] in [0, 1] normalized with the model's mean and std (synthetic images)."""
    mean, std = (np.array(v, np.float32)[:, None, None] for v in (processing.mean, processing.std))
    return ((pixels01 - mean) / std).astype(np.float32)


def load_image(path, processing: ImageProcessing | int, name: str | None = None) -> np.ndarray:
    """An image file (a path, or a binary file object named `name` in messages) -> float32
    [3, size, size], as `processing` says (an int: CLIP's at that size). Memory stays
    bounded whatever the file says:
    a JPEG is decoded at 1/2, 1/4 or 1/8 scale where that still leaves at least twice `size`
    on each side (Pillow's `draft`: close to, not equal to, resizing the full image), and an
    image that would still decode to more than MAX_PIXELS is refused before decoding, naming
    the file (Pillow's own limit would raise `DecompressionBombError`, or print a raw warning
    and decode it anyway)."""
    Image = pillow()
    name = name or path
    size = processing if isinstance(processing, int) else processing.size
    try:
        with _open_unlimited(Image, path) as img:
            full = img.size
            img.draft(None, (2 * size, 2 * size))  # JPEG only; other formats decode in full
            if img.size[0] * img.size[1] > MAX_PIXELS:
                raise ImageError(f"{name}: {full[0]} x {full[1]} pixels is more than the {MAX_PIXELS:,} the runner "
                                 "decodes (a JPEG may have up to 64 times that: it is decoded at reduced size); "
                                 "scale it down first")
            img.load()
            return preprocess(img, processing)
    except ImageError:
        raise
    except Image.UnidentifiedImageError as e:  # its message names the file object: "<_io.BytesIO object at 0x...>"
        raise ImageError(f"{name}: cannot read image (not a format Pillow reads)") from e
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{name}: cannot read image ({e})") from e


_PILLOW_LIMIT = threading.Lock()  # Image.MAX_IMAGE_PIXELS is Pillow's global: threads take turns changing it


def _open_unlimited(Image, path):
    """Image.open without Pillow's pixel limit (`load_image` applies its own, after draft),
    the limit put back before anything decodes."""
    with _PILLOW_LIMIT:
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def load_f32le(path: str | Path, size: int) -> np.ndarray:
    """A raw little-endian float32 [3, size, size] file, already normalized."""
    data = Path(path).read_bytes()
    if len(data) != 3 * size * size * 4:
        raise ImageError(f"{path}: {len(data)} bytes; a float32 3x{size}x{size} image has {3 * size * size * 4}")
    a = np.frombuffer(data, "<f4").reshape(3, size, size)
    if not np.all(np.isfinite(a)):
        raise ImageError(f"{path}: holds NaN or Inf")
    return a.astype(np.float32)
