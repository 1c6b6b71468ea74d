"""Photo search (runner/photos/): `index` and `search` on the demo CLIP bundle.

The demo's towers are seeded random weights: its image tower tells colors apart (discs of
one color land close together), its text tower knows no words. So text search is checked
against the ranking the same bundle gives through `clip-text` and `clip-image`, and, when the
float model itself ranks the color's image first (a trained demo), for that image too.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runner import images
from runner.clip import CLIP
from runner.errors import UserError
from runner.photos import INDEX_FILE, PhotoIndexError, build_index, read_index, search, store

from .conftest import ROOT, runner

COLORS = ["red", "green", "blue", "yellow"]
# One held-out sample of the trained demo per color (recipes/demo-clip/samples/labels.json).
SAMPLE_OF = {"red": "07-red-square.png", "green": "04-green-circle.png", "blue": "19-blue-square.png",
             "yellow": "00-yellow-triangle.png"}


def make_tree(root: Path, checkpoint_dir: Path) -> Path:
    """The four color samples at the top; calibration discs in nested directories, one per
    format; a corrupt PNG, a text file named .jpg, and a text file."""
    photo_dir = root / "photos"
    (photo_dir / "sub" / "deeper").mkdir(parents=True)
    for c in COLORS:
        shutil.copy(checkpoint_dir / "samples" / SAMPLE_OF[c], photo_dir / f"{c}.png")
    calibration = checkpoint_dir / "calibration"
    Image.open(calibration / "04.png").convert("RGB").save(photo_dir / "sub" / "deeper" / "04.jpg", quality=95)
    Image.open(calibration / "05.png").save(photo_dir / "sub" / "05.webp", lossless=True)
    Image.open(calibration / "06.png").save(photo_dir / "sub" / "06.gif")
    Image.open(calibration / "07.png").save(photo_dir / "sub" / "deeper" / "07.TIFF")
    (photo_dir / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (photo_dir / "notes.jpg").write_text("not an image at all\n")
    (photo_dir / "sub" / "readme.txt").write_text("neither\n")
    return photo_dir


IMAGES = {"red.png", "green.png", "blue.png", "yellow.png", "sub/deeper/04.jpg", "sub/05.webp", "sub/06.gif",
          "sub/deeper/07.TIFF"}


class CountingForward:
    """CLIP.image_features, counting the images it embeds."""

    def __init__(self, monkeypatch):
        self.images = 0
        original = CLIP.image_features

        def counted(model, pixels):
            self.images += len(pixels)
            return original(model, pixels)
        monkeypatch.setattr(CLIP, "image_features", counted)


def embeddings_of(index_dir: Path) -> dict[str, np.ndarray]:
    index = read_index(index_dir)
    rows = index.embeddings()
    return {e.path: np.asarray(rows[i], np.float32) for i, e in enumerate(index.entries)}


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture
def tree(tmp_path, checkpoint_dir):
    return make_tree(tmp_path, checkpoint_dir)


@pytest.fixture
def indexed(tmp_path, tree, bundle_dir):
    """The tree, indexed once on emulate: (photo dir, index dir, summary, log)."""
    log = io.StringIO()
    summary = build_index(bundle_dir, tree, tmp_path / "index", "emulate", log=log)
    return tree, tmp_path / "index", summary, log.getvalue()


def test_index_embeds_every_image_and_counts_the_rest(indexed, bundle_dir):
    photo_dir, index_dir, summary, log = indexed
    assert summary["images"] == summary["embedded"] == len(IMAGES)
    assert summary["skipped"] == 2 and summary["other_files"] == 1
    assert {s["input"] for s in summary["skipped_files"]} == {str(photo_dir / "sub" / "broken.png"),
                                                              str(photo_dir / "notes.jpg")}
    warnings = [line for line in log.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and all("cannot read image" in w for w in warnings), log
    index = read_index(index_dir)
    assert {e.path for e in index.entries} == IMAGES
    assert [e.path for e in index.entries] == sorted(IMAGES)
    for e in index.entries:
        st = (photo_dir / e.path).stat()
        assert (e.size, e.mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert set(index.skipped) == {"sub/broken.png", "notes.jpg"}
    rows = index.embeddings()
    assert rows.dtype == np.float16 and rows.shape == (len(IMAGES), 256)
    np.testing.assert_allclose(np.linalg.norm(rows.astype(np.float32), axis=-1), 1, atol=2e-3)
    # The files index writes: index.json, the embeddings it names, the lock. Nothing else.
    assert {p.name for p in index_dir.iterdir()} == {INDEX_FILE, index.embeddings_file, ".lock"}


def test_index_rows_are_what_clip_image_gives(indexed, bundle_dir, tmp_path):
    photo_dir, index_dir, _, _ = indexed
    rows = embeddings_of(index_dir)
    paths = sorted(rows)
    out = tmp_path / "clip-image.npy"
    # on the index's backend: cpu (what `auto` picks here) may round a layer's output one step apart
    run = runner("clip-image", bundle_dir, *(photo_dir / p for p in paths), "--backend", "emulate", "--out", out)
    assert run.returncode == 0, run.stderr
    np.testing.assert_allclose(np.stack([rows[p] for p in paths]), unit(np.load(out)), atol=1e-3)  # float16 rows


def test_reindex_embeds_only_new_and_changed_files(indexed, bundle_dir, checkpoint_dir, monkeypatch):
    photo_dir, index_dir, _, _ = indexed
    before = embeddings_of(index_dir)
    counter = CountingForward(monkeypatch)
    shutil.copy(checkpoint_dir / "calibration" / "09.png", photo_dir / "sub" / "new.png")  # new
    changed = photo_dir / "sub" / "deeper" / "04.jpg"
    Image.open(checkpoint_dir / "calibration" / "11.png").convert("RGB").save(changed, quality=95)
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # surely a new mtime
    (photo_dir / "green.png").unlink()  # deleted
    log = io.StringIO()
    summary = build_index(bundle_dir, photo_dir, index_dir, "emulate", log=log)
    assert counter.images == 2 and summary["embedded"] == 2
    assert (summary["unchanged"], summary["changed"], summary["removed"]) == (len(IMAGES) - 2, 1, 1)
    # The corrupt files are unchanged: not tried again, still counted.
    assert summary["skipped"] == 2 and summary["skipped_before"] == 2 and "warning" not in log.getvalue()
    after = embeddings_of(index_dir)
    assert set(after) == IMAGES - {"green.png"} | {"sub/new.png"}
    for p in IMAGES - {"green.png", "sub/deeper/04.jpg"}:
        np.testing.assert_array_equal(after[p], before[p])  # reused rows, bit for bit
    assert float(after["sub/deeper/04.jpg"] @ before["sub/deeper/04.jpg"]) < 0.999  # embedded again
    # Nothing changed: nothing embedded, nothing rewritten but index.json.
    counter.images = 0
    again = build_index(bundle_dir, photo_dir, index_dir, "emulate", log=None)
    assert counter.images == 0 and again["embedded"] == 0 and again["images"] == len(after)
    # A corrupt file that changes is tried again (and still fails).
    (photo_dir / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n other garbage")
    log = io.StringIO()
    third = build_index(bundle_dir, photo_dir, index_dir, "emulate", log=log)
    assert third["skipped"] == 2 and third["skipped_before"] == 1 and "broken.png" in log.getvalue()


def test_float32_rows_and_a_batch_that_fills_the_templates(tree, bundle_dir, tmp_path, monkeypatch):
    counter = CountingForward(monkeypatch)
    summary = build_index(bundle_dir, tree, tmp_path / "i32", "emulate", batch=3, dtype="float32", log=None)
    assert summary["batch"] == 3  # the demo's templates run one row at a time: any batch fills them
    assert counter.images == len(IMAGES)
    index = read_index(tmp_path / "i32")
    assert index.dtype == "float32" and index.embeddings().dtype == np.float32


def test_search_by_text_ranks_as_the_bundle_does(indexed, bundle_dir, checkpoint_dir, tmp_path):
    from runner.images import load_image
    from runner.contrastive import Contrastive
    from runner.load import load

    photo_dir, index_dir, _, _ = indexed
    paths = sorted(IMAGES)
    images = tmp_path / "images.npy"
    assert runner("clip-image", bundle_dir, *(photo_dir / p for p in paths), "--out", images).returncode == 0
    fp32 = load(bundle_dir, "fp32", checkpoint_dir)
    samples = np.stack([load_image(photo_dir / f"{c}.png", 64) for c in COLORS])
    float_images = unit(fp32.model.image_features(samples))
    for color in COLORS:
        prompt = f"a photo of a {color} object"
        text = tmp_path / "text.npy"
        assert runner("clip-text", bundle_dir, prompt, "--out", text).returncode == 0
        reference = dict(zip(paths, unit(np.load(images)) @ unit(np.load(text))[0]))
        result = search(index_dir, prompt, top=len(paths))
        got = [(Path(r["path"]).relative_to(photo_dir).as_posix(), r["score"]) for r in result["results"]]
        assert [p for p, _ in got] != [] and len(got) == len(paths)
        assert all(a[1] >= b[1] for a, b in itertools.pairwise(got))  # best first
        for p, score in got:
            assert score == pytest.approx(reference[p], abs=2e-3), (prompt, p)
        assert got[0][1] == pytest.approx(max(reference.values()), abs=2e-3)
        # A model that tells colors (the float model ranks this color's sample first among
        # the four): the index's best match among the samples is that sample too.
        float_text = unit(fp32.model.text_features(Contrastive(fp32).tokenize([prompt])))[0]
        if COLORS[int(np.argmax(float_images @ float_text))] == color:
            samples_ranked = [p for p, _ in got if p in {f"{c}.png" for c in COLORS}]
            assert samples_ranked[0] == f"{color}.png", prompt


def test_search_by_image_finds_the_same_image_first(indexed, tmp_path):
    photo_dir, index_dir, _, _ = indexed
    query = tmp_path / "query.png"
    shutil.copy(photo_dir / "blue.png", query)
    result = search(index_dir, image=query, top=3)
    assert len(result["results"]) == 3
    assert result["results"][0]["path"] == str(photo_dir / "blue.png")
    assert result["results"][0]["score"] > 0.999


def test_search_opens_only_the_query_tower(indexed, monkeypatch):
    from runner.executors import LazyDense

    opened = []
    original = LazyDense.load

    def record(self):
        opened.append(self.layer.name)
        return original(self)
    monkeypatch.setattr(LazyDense, "load", record)
    photo_dir, index_dir, _, _ = indexed
    search(index_dir, "a red thing")
    assert opened and all(n.startswith(("text_model.", "text_projection")) for n in opened)
    opened.clear()
    search(index_dir, image=photo_dir / "red.png")
    assert opened and all(n.startswith(("vision_model.", "visual_projection")) for n in opened)


def test_command_line(indexed, bundle_dir, tmp_path):
    photo_dir, index_dir, _, _ = indexed
    run = runner("index", bundle_dir, photo_dir, "--out", tmp_path / "cli-index", "--json")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["command"] == "index" and summary["bundle"] == str(bundle_dir) and summary["embedded"] == 8
    # --backend auto, as every model command: cpu here (no compiled templates), recorded for search
    assert summary["backend"] == "cpu" and "backend: cpu (--backend auto; not edgetpu" in run.stderr
    assert json.loads((tmp_path / "cli-index" / "index.json").read_text())["backends"] == ["cpu"]
    assert summary["skipped"] == 2 and {"input", "error"} == set(summary["skipped_files"][0])
    assert "images" in run.stderr  # the progress line
    run = runner("search", tmp_path / "cli-index", "a dog on the grass", "--top", "3", "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["command"] == "search" and result["bundle"] == str(bundle_dir.resolve())
    assert result["backend"] == "cpu" and result["input"] == "a dog on the grass"
    assert [set(r) for r in result["results"]] == [{"path", "score"}] * 3
    run = runner("search", index_dir, "a red thing")
    assert run.returncode == 0 and run.stdout.count(str(photo_dir)) == 5, run.stdout
    for args, message in [((index_dir,), "give a TEXT or --image"),
                          ((index_dir, "x", "--image", photo_dir / "red.png"), "give a TEXT or --image"),
                          ((tmp_path / "nowhere", "x"), "not a photo index"),
                          ((index_dir, "--image", photo_dir / "notes.jpg"), "notes.jpg: cannot read image")]:
        run = runner("search", *args)
        assert run.returncode == 2 and message in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
    run = runner("index", bundle_dir, photo_dir / "red.png", "--out", tmp_path / "x")
    assert run.returncode == 2 and "not a directory" in run.stderr


def test_an_index_of_another_bundle_is_refused(indexed, bundle_dir, tmp_path):
    photo_dir, index_dir, _, _ = indexed
    other = tmp_path / "other-bundle"
    shutil.copytree(bundle_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["note"] = "another build"
    (other / "manifest.json").write_text(json.dumps(manifest))
    before = (index_dir / INDEX_FILE).read_bytes()
    with pytest.raises(PhotoIndexError, match="made with the bundle .*demo-clip.* not with .*other-bundle"):
        search(index_dir, "a red thing", bundle=other)
    with pytest.raises(PhotoIndexError, match="made with the bundle"):
        build_index(other, photo_dir, index_dir, "emulate", log=None)
    assert (index_dir / INDEX_FILE).read_bytes() == before
    run = runner("search", index_dir, "a red thing", "--bundle", other)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    # The same bundle, moved: accepted.
    moved = tmp_path / "moved-bundle"
    shutil.copytree(bundle_dir, moved)
    assert search(index_dir, "a red thing", bundle=moved)["results"]


CRASH = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from runner.photos import build_index, store

    point = sys.argv[1]
    original_rows, original_write = store.write_rows, store.atomic_write

    def half_rows(f, rows, old, dims, dtype):  # the embeddings half written, then killed
        original_rows(f, rows[: len(rows) // 2], old, dims, dtype)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def half_index(path, data):  # the embeddings whole and renamed; index.json half written, then killed
        if path.name != "index.json":
            return original_write(path, data)
        def half(f):
            f.write(data.encode()[: len(data) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return original_write(path, half)

    if point == "embeddings":
        store.write_rows = half_rows
    else:
        store.atomic_write = half_index
    build_index(*sys.argv[2:5], "emulate", log=None)
""")


@pytest.mark.parametrize("point", ["embeddings", "index.json"])
def test_a_killed_write_leaves_the_previous_index_whole(indexed, bundle_dir, checkpoint_dir, point):
    photo_dir, index_dir, _, _ = indexed
    before_json = (index_dir / INDEX_FILE).read_bytes()
    before = search(index_dir, "a red thing", top=8)["results"]
    shutil.copy(checkpoint_dir / "calibration" / "10.png", photo_dir / "added.png")
    (photo_dir / "red.png").unlink()
    run = subprocess.run([sys.executable, "-c", CRASH, point, str(bundle_dir), str(photo_dir), str(index_dir)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == -9, run.stderr  # SIGKILL
    leftovers = {p.name for p in index_dir.iterdir()} - {INDEX_FILE, read_index(index_dir).embeddings_file, ".lock"}
    assert leftovers, "the crash left nothing behind: it did not happen mid-write"
    assert (index_dir / INDEX_FILE).read_bytes() == before_json
    assert search(index_dir, "a red thing", top=8)["results"] == before  # whole, and as it was
    summary = build_index(bundle_dir, photo_dir, index_dir, "emulate", log=None)
    assert summary["embedded"] == 1 and summary["removed"] == 1
    index = read_index(index_dir)
    assert {p.name for p in index_dir.iterdir()} == {INDEX_FILE, index.embeddings_file, ".lock"}


def test_long_runs_commit_as_they_go(tree, bundle_dir, tmp_path, monkeypatch):
    """With commits due after every batch, a run that dies before its end keeps what it did."""
    index_dir = tmp_path / "index"
    calls = {"n": 0}
    original = CLIP.image_features

    def dies_on_the_third(model, pixels):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(model, pixels)
    monkeypatch.setattr(CLIP, "image_features", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        build_index(bundle_dir, tree, index_dir, "emulate", batch=2, log=None, commit_every_s=0)
    assert len(read_index(index_dir).entries) == 4  # two batches of two
    monkeypatch.setattr(CLIP, "image_features", original)
    counter = CountingForward(monkeypatch)
    summary = build_index(bundle_dir, tree, index_dir, "emulate", batch=2, log=None)
    assert counter.images == len(IMAGES) - 4 and summary["images"] == len(IMAGES)


def test_a_decompression_bomb_is_a_warning_and_counted(tree, bundle_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 30000)  # the photos are at most 144x112
    Image.new("RGB", (300, 300), "red").save(tree / "bomb.png")
    log = io.StringIO()
    summary = build_index(bundle_dir, tree, tmp_path / "index", "emulate", log=log)
    assert summary["skipped"] == 3 and summary["images"] == len(IMAGES)
    bomb = [line for line in log.getvalue().splitlines() if "bomb.png" in line]
    assert len(bomb) == 1 and bomb[0].startswith("warning:") and "Traceback" not in log.getvalue()


def test_another_index_run_at_the_same_time_is_refused(indexed, bundle_dir):
    photo_dir, index_dir, _, _ = indexed
    with store.Lock(index_dir), pytest.raises(PhotoIndexError, match="another `index` is writing"):
        build_index(bundle_dir, photo_dir, index_dir, "emulate", log=None)


def test_a_directory_that_is_not_an_index_is_not_written(tree, bundle_dir, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("...")
    with pytest.raises(PhotoIndexError, match="neither a photo index .* nor empty"):
        build_index(bundle_dir, tree, busy, "emulate", log=None)


def tamper(index_dir: Path, change) -> None:
    doc = json.loads((index_dir / INDEX_FILE).read_text())
    change(doc)
    (index_dir / INDEX_FILE).write_text(json.dumps(doc))


@pytest.mark.parametrize("change,message", [
    (lambda d: d["entries"][0].update(path="../../etc/passwd"), r"entries\[0\]: field 'path' has a bad value"),
    (lambda d: d["entries"][1].update(path="/etc/passwd"), r"entries\[1\]: field 'path' has a bad value"),
    (lambda d: d["entries"][0].update(path="a//b.png"), "bad value"),
    (lambda d: d["entries"].append(d["entries"][0]), "listed twice"),
    (lambda d: d["entries"].pop(), r"float16 \[8, 256\], index.json says float16 \[7, 256\]"),
    (lambda d: d.update(dtype="float32"), "index.json says float32"),
    (lambda d: d.update(embeddings="../embeddings.npy"), "field 'embeddings' has a bad value"),
    (lambda d: d.update(version=2), "index version 2"),
    (lambda d: d.update(format="pickle"), "format 'pickle'"),
    (lambda d: d["bundle"].update(manifest_sha256="0" * 64), "made with the bundle"),
    (lambda d: d.update(backend="tpu"), "field 'backend' has a bad value"),
    (lambda d: d.pop("dims"), "missing field 'dims'"),
    (lambda d: d.update(entries={}), "field 'entries' has the wrong type"),
])
def test_a_bad_index_json_is_one_error_naming_it(indexed, change, message):
    _, index_dir, _, _ = indexed
    tamper(index_dir, change)
    with pytest.raises(PhotoIndexError, match=message) as e:
        search(index_dir, "a red thing")
    assert str(index_dir) in str(e.value) and "\n" not in str(e.value)


def test_bad_embeddings_files(indexed):
    _, index_dir, _, _ = indexed
    name = read_index(index_dir).embeddings_file
    np.save(index_dir / name, np.array([{"a": 1}] * 8, dtype=object), allow_pickle=True)
    with pytest.raises(PhotoIndexError, match=f"{name}: cannot read the embeddings .*Python objects"):
        search(index_dir, "a red thing")
    np.save(index_dir / name, np.full((8, 256), np.nan, np.float16))
    with pytest.raises(PhotoIndexError, match="NaN or Inf"):
        search(index_dir, "a red thing")
    (index_dir / name).write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(UserError, match=f"{name}: cannot read the embeddings"):
        search(index_dir, "a red thing")
    (index_dir / name).unlink()
    with pytest.raises(UserError, match=f"{name}: cannot read the embeddings"):
        search(index_dir, "a red thing")
