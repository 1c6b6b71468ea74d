"""Image preprocessing against transformers' CLIP image processor (the Pillow one)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from runner.images import ImageError, load_f32le, load_image, preprocess

transformers = pytest.importorskip("transformers")


def reference(img, size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    p = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return p(images=img.convert("RGB"), return_tensors="np")["pixel_values"][0]


def images():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    yield "rgb landscape", rgb
    yield "rgb portrait", Image.fromarray(rng.integers(0, 256, (150, 71, 3), dtype=np.uint8))
    yield "grayscale", rgb.convert("L")
    yield "rgba", rgb.convert("RGBA")
    yield "palette", rgb.convert("P")
    yield "small", Image.fromarray(rng.integers(0, 256, (20, 33, 3), dtype=np.uint8))


@pytest.mark.parametrize("name,img", list(images()))
def test_matches_transformers(name, img):
    ours = preprocess(img, 64)
    ref = reference(img, 64)
    assert ours.shape == ref.shape == (3, 64, 64)
    # One uint8 step after normalization is about 0.015; resampling is the same Pillow call.
    assert np.abs(ours - ref).max() < 1e-4, name


def test_16_bit_image(tmp_path):
    a = (np.arange(64 * 80, dtype=np.uint16).reshape(64, 80) * 12)
    path = tmp_path / "deep.png"
    Image.fromarray(a).save(path)
    x = load_image(path, 32)
    assert x.shape == (3, 32, 32) and np.isfinite(x).all()
    assert x.max() - x.min() > 3  # the range survived the conversion to 8 bits


def test_bad_files(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageError, match="broken.png: cannot read image"):
        load_image(bad, 32)
    raw = tmp_path / "img.f32"
    raw.write_bytes(np.zeros(3 * 32 * 32, "<f4").tobytes()[:-4])
    with pytest.raises(ImageError, match="img.f32: .* bytes"):
        load_f32le(raw, 32)
    raw.write_bytes(np.full(3 * 32 * 32, np.nan, "<f4").tobytes())
    with pytest.raises(ImageError, match="NaN"):
        load_f32le(raw, 32)
