"""The Gemma demo through the build and the runner: doit makes a bundle of int8 decoder layers
and LM-head tiles; `runner gemma` decodes with every backend and head mode."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runner import executors, lm_head
from runner.bundle import Bundle
from runner.checkpoint import Checkpoint
from runner.edgetpu_codec import decode_dense
from runner.executors import LazyDense, TemplateInterpreter
from runner.gemma import Gemma, GemmaConfig, KVCache
from runner.generate import Sampler, generate
from runner.lm_head import DEFAULT_CAPACITY, HeadError, Int8Tiles, TileHead, make_head
from runner.load import load
from runner.nn import float_linear

from .conftest import FIXTURES, GENERATED_GEMMA, doit, runner

PROMPT = ("<start_of_turn>user please open door with name Alice and then read sensor humidity"
          "<end_of_turn><start_of_turn>model")  # held out: not in prompts.txt


@pytest.fixture(scope="module")
def gemma_demo(tmp_path_factory):
    """(bundle dir, checkpoint dir). With the real compiled template beside the project, the
    tiles and layers get edgetpu artifacts too."""
    artifacts = tmp_path_factory.mktemp("gemma") / "artifacts"
    templates = [f"templates={FIXTURES}"] if (FIXTURES / "dense_256_edgetpu.tflite").is_file() else []
    out = doit(artifacts, *GENERATED_GEMMA, *templates).stdout
    assert ".  checkpoint:demo-gemma" in out and ".  bundle" in out
    return artifacts / "bundles" / "demo-gemma", artifacts / "demo" / "gemma"


@pytest.fixture(scope="module")
def bundle(gemma_demo):
    return Bundle.open(gemma_demo[0])


def test_bundle_holds_decoder_layers_and_head_tiles(bundle):
    """28 decoder linears; a 1024-token vocabulary in 4 tiles of 256 rows, each its own artifact;
    the embedding is int8 with a scale per row, and no float copy of it is shipped."""
    assert bundle.family == "gemma" and len(bundle.layers) == 4 * 7
    head = bundle.lm_head
    assert (head.tile_rows, head.vocab_size, len(head.tiles)) == (256, 1024, 4)
    assert len({t.files["params"].sha256 for t in head.tiles}) == 4
    assert bundle.host["model.embed_tokens.weight_int8"].dtype == np.int8
    assert bundle.host["model.embed_tokens.weight_scale"].shape == (1024,)
    assert "model.embed_tokens.weight" not in bundle.host


def test_tiles_are_the_embedding_rows(bundle, gemma_demo):
    """Tile i's int8 weights are rows [256 i, 256 (i + 1)) of the tied embedding, quantized per row."""
    embedding = Checkpoint(gemma_demo[1])["model.embed_tokens.weight"]
    for i, tile in enumerate(bundle.lm_head.tiles):
        params = decode_dense(tile.files["params"].path.read_bytes(), tile.n_in, tile.n_out)
        rows = embedding[256 * i : 256 * (i + 1)]
        back = params.weights.astype(np.float32) * bundle.host[f"lm_head.tiles.{i}.weight_scale"][:, None]
        assert (np.abs(back - rows) <= np.abs(rows).max(1, keepdims=True) / 127 * 0.51).all()


def test_a_vocabulary_not_a_multiple_of_the_tile_is_padded(tmp_path):
    """tile_rows 384 over 1024 tokens: 3 tiles, the last with 128 zero rows that never win."""
    artifacts = tmp_path / "artifacts"
    doit(artifacts, *GENERATED_GEMMA, "lm_head={tile_rows: 384}", "layers", "bundle")
    bundle = Bundle.open(artifacts / "bundles" / "demo-gemma")
    head = bundle.lm_head
    assert (head.tile_rows, head.vocab_size, [t.n_out for t in head.tiles]) == (384, 1024, [384] * 3)
    assert bundle.manifest["lm_head"]["tiles"][2]["rows"] == [768, 1024]
    params = decode_dense(head.tiles[2].files["params"].path.read_bytes(), 256, 384)
    assert not params.weights[256:].any() and params.weights[:256].any()
    tiles = TileHead(bundle, "emulate", "tpu-preload")
    logits = tiles(np.random.default_rng(3).standard_normal(256).astype(np.float32))
    assert logits.shape == (1024,) and np.isfinite(logits).all()
    # Another head setting redoes the tiles only: the decoder layers come from the cache.
    out = doit(artifacts, *GENERATED_GEMMA, "lm_head={tile_rows: 384, peak_sigmas: 3}").stdout
    assert ".  layers" in out and ".  bundle" in out
    again = Bundle.open(artifacts / "bundles" / "demo-gemma")
    assert [t.files["params"].sha256 for t in again.lm_head.tiles] != [t.files["params"].sha256 for t in head.tiles]
    assert [x.files["params"].sha256 for x in again.layers] == [x.files["params"].sha256 for x in bundle.layers]


def test_every_template_layer_runs_alike_on_emulate_and_cpu(bundle, monkeypatch):
    x = np.random.default_rng(0).integers(0, 256, (19, 256), dtype=np.uint8)
    for layer in bundle.tpu_layers:
        a = LazyDense(layer.files["params"].path, layer, "emulate")(x).astype(int)
        cpu = TemplateInterpreter(layer.files["cpu"].path, layer)
        b = cpu(x).astype(int)  # 19 rows in one call: the interpreter is resized to them
        assert np.abs(a - b).max() <= 1, layer.name
        assert np.array_equal(cpu(x[3:4]).astype(int), b[3:4]), layer.name  # and back to one row
    monkeypatch.setattr(executors, "MAX_ROWS", 8)  # 19 rows in chunks of 7, the last one padded
    assert np.array_equal(cpu(x).astype(int), b) and cpu._rows == 7


def test_tiles_have_their_own_caching_tokens(bundle):
    if "edgetpu" not in bundle.lm_head.tiles[0].files:
        pytest.skip(f"built without the real compiled template (not at {FIXTURES})")
    from runner.edgetpu_codec import parse_compiled
    tokens = {e.token for t in bundle.tpu_layers
              for e in parse_compiled(t.files["edgetpu"].path.read_bytes()).executables}
    assert len(tokens) == len(bundle.tpu_layers)


def _teacher_forced(gemma_demo, backend, mode, **options):
    """Logits of the int8 path and the float model at every position of PROMPT."""
    from tokenizers import Tokenizer
    bundle_dir, checkpoint_dir = gemma_demo
    loaded = load(bundle_dir, backend, lm_head=mode, **options)
    checkpoint = Checkpoint(checkpoint_dir)
    config = GemmaConfig.from_dict(loaded.bundle.config)
    ids = np.array(Tokenizer.from_file(str(loaded.bundle.tokenizer.path)).encode(PROMPT).ids)
    hidden = loaded.model.forward(ids, KVCache(config))
    a = np.stack([loaded.head(h) for h in hidden])
    ref = Gemma(config, checkpoint, float_linear(checkpoint))
    return a, ref.logits(ref.forward(ids, KVCache(config)))


@pytest.mark.parametrize("backend", ["emulate", "cpu"])
@pytest.mark.parametrize("mode", ["cpu", "tpu-preload"])
def test_int8_model_against_float(gemma_demo, backend, mode):
    """Int8 decoder and embedding, and the head in `mode`, teacher-forced against the float model.
    Measured on 21 positions, both backends: cpu head 0.99880 mean / 0.99795 min cosine, tpu
    head 0.99867 / 0.99775; top-1 agreement 1.0 for both. (With the head's output range set
    by calibration peaks alone, the winning logits clamped: tpu head 0.99814 / 0.99536.)"""
    a, r = _teacher_forced(gemma_demo, backend, mode)
    cos = (a * r).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(r, axis=-1)
    assert cos.mean() > 0.998 and cos.min() > 0.997
    assert (a.argmax(-1) == r.argmax(-1)).mean() >= 0.95


def test_rescore_gives_the_cpu_heads_logits(gemma_demo):
    """--rescore K: the candidates' logits are the cpu head's (its int8 products, to float
    rounding), everything else -inf; so the argmax equals the cpu head's whenever the cpu
    head's best token is a candidate."""
    loaded = load(gemma_demo[0], "cpu", lm_head="tpu-lazy", capacity=2, rescore=8)
    cpu_head, _ = make_head(loaded.bundle, "cpu", "cpu")
    h = np.random.default_rng(1).standard_normal((40, 256)).astype(np.float32)
    among = 0
    for row in h:
        got, exact = loaded.head(row), cpu_head(row)
        finite = np.isfinite(got)
        assert finite.sum() == 8
        np.testing.assert_allclose(got[finite], exact[finite], rtol=0, atol=1e-6 * np.abs(exact).max())
        if finite[exact.argmax()]:
            among += 1
            assert got.argmax() == exact.argmax()
    assert among >= 36  # the TPU's 8 best nearly always hold the exact best


@pytest.mark.parametrize("backend", ["emulate", "cpu"])
def test_rescore_decodes_as_the_cpu_head(gemma_demo, backend):
    """Greedy decoding with --rescore equals the cpu head's, token for token."""
    prompt = [2] + list(range(40, 60))
    tokens = {}
    for mode, options in (("cpu", {}), ("tpu-lazy", {"capacity": 2, "rescore": 16})):
        loaded = load(gemma_demo[0], backend, lm_head=mode, **options)
        tokens[mode] = [s.token for s in generate(loaded.model, loaded.head, prompt, 24, Sampler())]
    assert tokens["cpu"] == tokens["tpu-lazy"] and len(tokens["cpu"]) == 24


def test_the_cpu_head_runs_int8_products_as_exact_as_a_float_hidden_state(bundle):
    """The cpu head widened the whole int8 table to float32 at every token (9x llama.cpp's
    time per token at 270M, #20). On the interpreter backends it runs the bundle's hybrid
    int8 models instead, on h and on what h's int8 codes left of it: TFLite's kernel is the
    reference for both the numpy replica (rescore's) and the agreement with float h."""
    head, table = make_head(bundle, "cpu", "cpu")
    assert isinstance(head.tiles, Int8Tiles) and head.tiles.head.vocab_size == len(table.q)
    rng = np.random.default_rng(2)
    for k in range(12):
        row = (rng.standard_normal(256) * (0.1 + k)).astype(np.float32)
        row[k] += 30.0 * (k % 3)  # outliers, as final hidden states have
        got = head(row)
        ref = (table.q.astype(np.float64) @ row.astype(np.float64)) * table.scale
        largest = np.abs(ref).max()
        assert np.abs(got - ref).max() <= 1e-4 * largest  # measured 0.5-2.3e-5; one int8 part alone: about 1e-2
        assert got.argmax() == ref.argmax()
        replica = table.logits(row, np.arange(len(ref)))
        assert np.abs(replica - got).max() <= 1e-6 * largest
    emulate_head, _ = make_head(bundle, "emulate", "cpu")  # numpy only: float h against the table
    assert emulate_head.tiles is None


def test_the_cpu_head_runs_one_part_over_the_table_and_keeps_the_winner_exact(bundle, monkeypatch):
    """Greedy (margin 0): only h's first int8 part runs over the whole table; the tokens that
    could be the best get the second part added from their rows. A margin above zero
    (sampling) gets every logit's two parts, as a call without one. Reference: the two parts
    through TFLite's kernel (margin None)."""
    head, table = make_head(bundle, "cpu", "cpu")
    assert np.allclose(table.norms, np.linalg.norm(table.q.astype(np.float64), axis=1) * table.scale, rtol=1e-6)
    rng = np.random.default_rng(5)
    for k in range(12):
        row = (rng.standard_normal(256) * (0.1 + k)).astype(np.float32)
        row[k] += 30.0 * (k % 3)
        full = head(row)
        largest = np.abs(full).max()
        head.stats.take()
        got = head(row, margin=0.0)
        assert got.argmax() == full.argmax()
        assert abs(got.max() - full.max()) <= 1e-5 * largest
        assert np.abs(got - full).max() <= 2e-2 * largest  # the rest: h's codes alone
        assert 0 < head.stats.take()["rescored"] < len(full)
        assert np.array_equal(head(row, margin=0.05 * largest), full) and head.stats.take()["rescored"] == 0
    monkeypatch.setattr(lm_head, "CANDIDATE_LIMIT", 0)  # a flat distribution: both parts everywhere
    assert np.abs(head(row, margin=0.0) - full).max() <= 1e-6 * largest


def test_the_head_rows_are_read_back_alike_by_both_of_tflites_kernels(bundle):
    """`two_part_rows` hands the kernel rows already on its int8 grid, so XNNPACK's kernel
    (which the head runs, rounding halves to even) and TFLite's builtin one (halves away from
    zero) read back the same codes: their logits agree with each other and with the integer
    products of those codes, also on rows with exact halves and one-signed rows."""
    tile = bundle.int8_head.files[0].path
    kernels = [executors.TemplateInterpreter(tile, xnnpack=x) for x in (True, False)]
    table = lm_head.Int8Table(bundle.host)
    n = bundle.int8_head.tile_rows
    rng = np.random.default_rng(9)
    cases = [(rng.standard_normal(256) * 3).astype(np.float32),
             np.abs(rng.standard_normal(256)).astype(np.float32),  # all positive
             -np.abs(rng.standard_normal(256)).astype(np.float32),  # all negative
             (np.arange(256) - 127.5).astype(np.float32) / 2]  # every code a half step
    for h in cases:
        rows, parts = lm_head.two_part_rows(h)
        xnnpack, builtin = (k(rows)[:, :n] for k in kernels)
        products = np.stack([table.second_part(p, np.arange(n)) for p in parts])
        largest = np.abs(products).max(axis=1, keepdims=True)
        assert np.all(np.abs(xnnpack - builtin) <= 1e-6 * largest)
        assert np.all(np.abs(xnnpack - products) <= 1e-6 * largest)
        exact = (table.q[:n].astype(np.float64) @ h.astype(np.float64)) * table.scale[:n]
        assert np.abs(xnnpack.sum(0) - exact).max() <= 1e-4 * np.abs(exact).max()
    # the serve engine's rows go together (`two_parts`): each row's parts are those it gets alone
    stacked = np.stack(cases + [np.zeros(256, np.float32)])
    first, second, codes, rest_codes = lm_head.two_parts(stacked)
    for i, h in enumerate(stacked):
        rows, parts = lm_head.two_part_rows(h)
        assert np.array_equal(rows, np.stack([first[i], second[i]]))
        for got, alone in zip((lm_head.row_part(codes, i), lm_head.row_part(rest_codes, i)), parts):
            assert got[0] == alone[0] and got[1] == alone[1] and np.array_equal(got[2], alone[2])
    assert not first[-1].any() and lm_head.row_part(codes, len(cases))[1] == 0  # an all-zero row: zero point 0


def test_a_changed_int8_head_file_is_found_by_check(gemma_demo, tmp_path):
    import shutil
    copy = tmp_path / "bundle"
    shutil.copytree(gemma_demo[0], copy)
    target = next((copy / "int8_head").iterdir())
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 1
    target.write_bytes(bytes(data))
    run = runner("check", copy)
    assert run.returncode == 1 and "int8 head tile 0" in run.stdout and target.name in run.stdout, run.stdout
    # --quick checks sizes only; the tiles are still opened, so a broken one of the right size is found
    data[:8] = bytes(8)  # no root table, no TFL3 identifier
    target.write_bytes(bytes(data))
    run = runner("check", copy, "--quick")
    assert run.returncode == 1 and "problem:" in run.stdout and target.name in run.stdout, run.stdout
    assert "Traceback" not in run.stderr and "cpu no" in run.stdout


def test_an_interpreter_without_the_heads_operator_version_falls_back_to_numpy(gemma_demo, tmp_path):
    """tflite-runtime 2.14 (`runner-legacy`) has no FULLY_CONNECTED version 12, which the
    int8 head's hybrid models are. The cpu head then runs in numpy, with the same tokens,
    and says so in one line naming the file. An interpreter lacking a version looks like
    this one given tiles whose version is set beyond any release (99)."""
    import shutil
    import struct

    from runner.flatbuf import Window

    copy = tmp_path / "bundle"
    shutil.copytree(gemma_demo[0], copy)
    for tile in sorted((copy / "int8_head").iterdir()):
        data = bytearray(tile.read_bytes())
        for code in Window.whole(bytes(data), str(tile)).root(b"TFL3").tables(1, "operator code"):
            if max(code.scalar(0, "b"), code.scalar(3, "i")) == 9:  # FULLY_CONNECTED
                struct.pack_into("<i", data, code.field_pos(2), 99)  # its version field
        tile.write_bytes(bytes(data))
    args = ["--token-ids", "2,40,41,42", "--steps", "8", "--backend", "cpu", "--json", "--ignore-eos"]
    before, after = runner("gemma", gemma_demo[0], *args), runner("gemma", copy, *args)
    assert before.returncode == 0 and after.returncode == 0, after.stderr
    assert "note:" not in before.stderr
    note = [line for line in after.stderr.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "FULLY_CONNECTED version 99" in note[0] and "int8_head" in note[0], after.stderr
    assert json.loads(after.stdout)["tokens"] == json.loads(before.stdout)["tokens"]
    check = runner("check", copy, "--quick")  # sizes only: the patched tiles' sha256 differ
    assert check.returncode == 0 and "note: the cpu LM head runs in numpy" in check.stdout, check.stdout
    assert "note:" not in runner("check", gemma_demo[0], "--quick").stdout


def test_lru_keeps_the_most_recently_used_tiles(bundle):
    head = TileHead(bundle, "emulate", "tpu-lazy", capacity=2)
    for i in (0, 1, 0, 2, 1):  # 2 evicts 1 (0 was used after it), then 1 evicts 0
        head.tile(i)
    assert list(head.open) == [2, 1]
    assert head.stats.take() == {"tiles": 0, "hits": 1, "misses": 4, "evictions": 2, "rescored": 0}
    # Open tiles run first, so a sweep of 4 tiles through 2 slots hits twice per step, not never.
    assert head.tiles_to_run() == [2, 1, 0, 3]
    head(np.ones(256, np.float32))
    head(np.ones(256, np.float32))
    assert head.stats.take() == {"tiles": 8, "hits": 4, "misses": 4, "evictions": 4, "rescored": 0}


def test_shortlist_runs_the_tiles_that_scored_best(bundle):
    full = TileHead(bundle, "emulate", "tpu-preload")
    short = TileHead(bundle, "emulate", "tpu-preload", shortlist=2)
    h = np.random.default_rng(2).standard_normal(256).astype(np.float32)
    first = short(h)  # the first step runs every tile
    assert np.array_equal(first, full(h)) and short.stats.take()["tiles"] == 4
    best_tiles = set(np.argsort(-full.best)[:2].tolist())
    second = short(h)
    assert short.stats.take()["tiles"] == 2
    ran = {i for i in range(4) if np.isfinite(second[256 * i])}
    assert ran == best_tiles and second.argmax() == first.argmax()


def test_head_options_that_do_not_fit_are_refused(bundle):
    with pytest.raises(HeadError, match="capacity"):
        TileHead(bundle, "emulate", "tpu-lazy", capacity=0)
    with pytest.raises(HeadError, match="shortlist"):
        TileHead(bundle, "emulate", "tpu-preload", shortlist=5)
    with pytest.raises(HeadError, match="TPU heads"):
        make_head(bundle, "emulate", "cpu", rescore=4)


@pytest.mark.parametrize("backend", ["emulate", "cpu"])
def test_runner_gemma_end_to_end(gemma_demo, backend):
    """`runner gemma` with each head mode: tokens, text, timings; greedy --rescore equals the cpu head."""
    results = {}
    for mode in (["cpu"], ["tpu-preload"], ["tpu-lazy", "--lm-cache-capacity", "2"],
                 ["tpu-preload", "--shortlist", "2"], ["tpu-lazy", "--lm-cache-capacity", "3", "--rescore", "16"]):
        run = runner("gemma", gemma_demo[0], "--prompt", "please set timer", "--steps", "12", "--backend", backend,
                     "--lm-head", *mode, "--json", "--rounds", "2", "--ignore-eos")
        assert run.returncode == 0, run.stderr
        r = json.loads(run.stdout)
        assert len(r["tokens"]) == 12 and isinstance(r["text"], str) and r["prompt_tokens"][0] == 2
        assert r["setup_ms"] > 0 and r["prefill_ms"] > 0 and r["ms_per_token"] > 0 and len(r["rounds"]) == 2
        assert r["rounds"][0]["tokens"] == r["rounds"][1]["tokens"]  # greedy, and the cache is clean each round
        results[" ".join(mode)] = r
    assert results["tpu-lazy --lm-cache-capacity 3 --rescore 16"]["tokens"] == results["cpu"]["tokens"]
    assert results["cpu"]["head"]["tiles"] == 0 and results["tpu-preload"]["head"]["tiles"] == 4 * 12
    lazy = results["tpu-lazy --lm-cache-capacity 2"]
    assert lazy["head"]["misses"] > 0 and lazy["head"]["evictions"] > 0 and lazy["head"]["hits"] > 0
    assert results["tpu-preload --shortlist 2"]["head"]["tiles"] == 4 + 2 * 11
    # Streaming text output, without --json.
    run = runner("gemma", gemma_demo[0], "--token-ids", "2,40,41,42", "--steps", "5", "--backend", backend)
    assert run.returncode == 0 and "setup_ms" in run.stdout and "ms_per_token" in run.stdout, run.stderr


def test_fp32_backend_decodes_with_the_float_model(gemma_demo):
    bundle_dir, checkpoint_dir = gemma_demo
    run = runner("gemma", bundle_dir, "--token-ids", "2,40,41,42", "--steps", "6", "--backend", "fp32",
                 "--checkpoint", checkpoint_dir, "--json", "--ignore-eos")
    assert run.returncode == 0, run.stderr
    checkpoint = Checkpoint(checkpoint_dir)
    config = GemmaConfig.from_dict(checkpoint.config)
    model, cache, ids = Gemma(config, checkpoint, float_linear(checkpoint)), None, [2, 40, 41, 42]
    cache = KVCache(config)
    x, expected = ids, []
    for _ in range(6):
        token = int(model.logits(model.forward(np.array(x), cache)[-1:]).argmax())
        expected.append(token)
        x = [token]
    assert json.loads(run.stdout)["tokens"] == expected


@pytest.mark.parametrize("args, message", [
    (["--token-ids", "2,5000"], "token id 5000 is outside the vocabulary [0, 1024)"),
    (["--token-ids", "2,-1"], "token id -1 is outside the vocabulary"),
    (["--token-ids", "2,x"], "expected comma-separated integers"),
    (["--prompt", "   "], "the prompt is empty"),
    (["--prompt", "a b c " * 300], "leave no room in the model's context of 256"),
    (["--prompt", "hi", "--lm-head", "cpu", "--rescore", "4"], "for the TPU heads"),
    (["--prompt", "hi", "--lm-head", "tpu-lazy", "--lm-cache-capacity", "0"], "must be at least 1, got 0"),
    (["--prompt", "hi", "--backend", "fp32"], "needs --checkpoint"),
])
def test_bad_gemma_input_gets_one_clear_line(gemma_demo, args, message):
    run = runner("gemma", gemma_demo[0], *args)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["tiles"][1].update(rows=[0, 256]), "lm_head.tiles[1]: field 'rows' has a bad value"),
    (lambda h: h["tiles"].pop(), "lm_head: field 'tiles' has a bad value"),
    (lambda h: h.update(vocab_size=1000), "lm_head.tiles[3]: field 'rows' has a bad value"),
    (lambda h: (h.update(vocab_size=1000), h["tiles"][3].update(rows=[768, 1000])),
     "lm_head covers 1000 tokens of width 256, the config says 1024 of 256"),
    (lambda h: h["tiles"][0].update(placement="host"), "a TPU layer of 256 outputs like the other tiles"),
])
def test_a_manifest_with_a_bad_head_is_refused(gemma_demo, tmp_path, edit, message):
    import shutil
    copy = tmp_path / "bundle"
    shutil.copytree(gemma_demo[0], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest["lm_head"])
    (copy / "manifest.json").write_text(json.dumps(manifest))
    run = runner("gemma", copy, "--prompt", "hi", "--lm-head", "tpu-preload")
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_a_clip_bundle_is_not_a_gemma_one(bundle_dir, gemma_demo):
    run = runner("gemma", bundle_dir, "--prompt", "hi")
    assert run.returncode == 2 and "a CLIP bundle; `gemma` needs a Gemma one" in run.stderr
    run = runner("clip-text", gemma_demo[0], "hi")
    assert run.returncode == 2 and "a Gemma bundle; embedding images and texts needs a CLIP or SigLIP one" in run.stderr


def test_tpu_lazy_alone_keeps_the_default_number_of_tiles_open(gemma_demo, bundle):
    """`--lm-head tpu-lazy` without --lm-cache-capacity: 8 tiles, or every tile of a smaller
    head (the demo's has 4). It used to refuse to start."""
    assert TileHead(bundle, "emulate", "tpu-lazy").capacity == min(DEFAULT_CAPACITY, 4) == 4
    run = runner("gemma", gemma_demo[0], "--prompt", "please set timer", "--steps", "4", "--lm-head", "tpu-lazy",
                 "--backend", "emulate", "--json", "--ignore-eos")
    assert run.returncode == 0 and json.loads(run.stdout)["head"]["misses"] == 4, run.stderr
