"""Shared test fixtures. The real compiled template lives outside the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures" / "edgetpu"

# The generated random Gemma (prepare/demo_models.py `make_demo_gemma`: every linear 256x256, a
# 1024-token tokenizer, prompts.txt): quick to build, for tests of the Gemma build and runner
# that need no trained answers. recipes/demo-gemma.yaml is the trained Function-Gemma.
GENERATED_GEMMA = ("recipe=recipes/demo-gemma.yaml", "checkpoint=artifacts/demo/gemma", "generate=demo-gemma",
                   "pad_outputs=0", "lm_head={tile_rows: 256}",
                   "calibration={prompts: prompts.txt, synthetic: 8, max_rows: 4096, seed: 0}",
                   "verify={prompts: heldout-prompts.txt, synthetic: 4, tokens: 48, greedy_steps: 16}")


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    if not (FIXTURES / "dense_256_edgetpu.tflite").is_file():
        pytest.skip(f"the real compiled template is not at {FIXTURES} (it ships beside the project "
                    "in ../shared, not in the repository)")
    return FIXTURES


@pytest.fixture(scope="session")
def compiled_bytes(fixture_dir) -> bytes:
    return (fixture_dir / "dense_256_edgetpu.tflite").read_bytes()


@pytest.fixture(scope="session")
def uncompiled_bytes(fixture_dir) -> bytes:
    return (fixture_dir / "dense_256.tflite").read_bytes()


def specials_first(demo, directory, eos_token_id=1):
    """The demo checkpoint with its tokenizer renumbered as many tokenizers number theirs:
    start of text 0, end of text 1, then the rest (the embedding rows move along)."""
    out = shutil.copytree(demo, directory)
    tok = json.loads((out / "tokenizer.json").read_text())
    start, end = (next(t["id"] for t in tok["added_tokens"] if t["content"] == name)
                  for name in ("<|startoftext|>", "<|endoftext|>"))
    order = [start, end] + [i for i in range(end + 1) if i not in (start, end)]  # new id -> old id
    new = {old: i for i, old in enumerate(order)}
    tok["model"]["vocab"] = {k: new[v] for k, v in tok["model"]["vocab"].items()}
    for t in tok["added_tokens"]:
        t["id"] = new[t["id"]]
        tok["model"]["vocab"][t["content"]] = t["id"]  # in the vocabulary itself, as such tokenizers have them
    for t in tok["post_processor"]["special_tokens"].values():
        t["ids"] = [new[i] for i in t["ids"]]
    (out / "tokenizer.json").write_text(json.dumps(tok))
    tensors = load_file(out / "model.safetensors")
    name = "text_model.embeddings.token_embedding.weight"
    tensors[name] = tensors[name][order]
    save_file(tensors, out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    config["text_config"].update(bos_token_id=0, eos_token_id=eos_token_id, pad_token_id=1)
    (out / "config.json").write_text(json.dumps(config))
    return out


# --- the demo CLIP bundle, built once per session by the real doit ------------------------

def doit(artifacts, *args, check=True):
    env = dict(os.environ, CORAL_ARTIFACTS=str(artifacts))
    run = subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), *args],
                         capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    if check:
        assert run.returncode == 0, run.stdout + run.stderr
    return run


def runner(*args, env: dict | None = None):
    """`python -m runner ARGS`, with `env` added to this process's environment."""
    return subprocess.run([sys.executable, "-m", "runner", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=dict(os.environ, **env) if env else None)


HIDE_AND_RUN = ("import runpy, sys\n"
                "for name in sys.argv[1].split(','):\n"
                "    sys.modules[name] = None\n"
                "sys.argv = ['runner', *sys.argv[2:]]\n"
                "runpy.run_module('runner', run_name='__main__', alter_sys=True)\n")


def runner_without(hidden: str, *args):
    """`python -m runner ARGS` as on a machine without the packages `hidden` names (comma-separated):
    a None in sys.modules makes importing one raise ModuleNotFoundError, as a missing one does."""
    return subprocess.run([sys.executable, "-c", HIDE_AND_RUN, hidden, *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The default `doit` (the demo recipe, no compiled template): (artifacts dir, doit output)."""
    artifacts = tmp_path_factory.mktemp("demo") / "artifacts"
    return artifacts, doit(artifacts).stdout


def warm_artifacts(demo, directory: Path) -> Path:
    """A new artifacts directory holding the demo build's cache (its template among it): a
    test's build there skips TensorFlow's template generation."""
    artifacts = directory / "artifacts"
    shutil.copytree(demo[0] / "cache", artifacts / "cache")
    return artifacts


@pytest.fixture(scope="session")
def bundle_dir(demo):
    return demo[0] / "bundles" / "demo-clip"


DEMO_CLIP = ROOT / "recipes" / "demo-clip"  # the trained demo's committed checkpoint


@pytest.fixture(scope="session")
def checkpoint_dir(demo):
    return DEMO_CLIP


@pytest.fixture(scope="session")
def samples(checkpoint_dir):
    """Four of the held-out drawn images (samples/labels.json has what each shows)."""
    return sorted((checkpoint_dir / "samples").glob("*.png"))[:4]
