"""Image preprocessing against transformers' CLIP image processor (the Pillow one)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from runner.images import MAX_PIXELS, ImageError, load_f32le, load_image, preprocess

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


def test_a_jpeg_beyond_pillows_bomb_limit_is_read_at_reduced_size(tmp_path):
    """14000 x 13000 is past Pillow's DecompressionBombError limit (179 M pixels); the runner
    decodes it at 1/8 scale (1750 x 1625) and gives the embedding's pixels, without a warning."""
    path = tmp_path / "huge.jpg"
    Image.new("L", (14000, 13000), 128).save(path, quality=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = load_image(path, 32)
    assert x.shape == (3, 32, 32) and np.allclose(x, preprocess(Image.new("RGB", (64, 64), (128,) * 3), 32), atol=0.02)


def test_reduced_size_decoding_is_close_to_the_full_image(tmp_path):
    """A photo-sized JPEG decoded at reduced size (never below twice the input) against the
    whole image resized as CLIP's processor does: within a few uint8 steps."""
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((1600, 1200), Image.BICUBIC)
    path = tmp_path / "photo.jpg"
    smooth.save(path, quality=95)
    with Image.open(path) as full:
        reference = preprocess(full, 64)
    with Image.open(path) as drafted:
        drafted.draft(None, (128, 128))
        assert drafted.size == (200, 150)  # the reduced decoding does happen
    assert np.abs(load_image(path, 64) - reference).max() < 0.05  # about 3 uint8 steps (0.029 measured)


def test_an_image_beyond_the_pixel_limit_is_refused_naming_it(tmp_path):
    """A 12000 x 9000 PNG (Pillow printed a raw DecompressionBombWarning, then decoded it in
    894 MB): refused before decoding, one line naming the file."""
    path = tmp_path / "wide.png"
    Image.new("L", (12000, 9000), 0).save(path, compress_level=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match=r"wide.png: 12000 x 9000 pixels is more than the 67,108,864"):
            load_image(path, 32)
    assert MAX_PIXELS == 1 << 26
