"""Bad recipes, checkpoints, images and bundles: one clear error naming the file and the problem."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from prepare.recipe import RecipeError, download_command, hf_program, load_recipe

from .conftest import ROOT, doit, runner, specials_first, warm_artifacts

DEMO_KEYS = "name: r\nfamily: clip\ncheckpoint: {ckpt}\ncalibration:\n  synthetic: 2\n"


def recipe_file(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, needle", [
    ("name: r\nbogus: 1\n", "unknown key 'bogus'"),
    ("name: r\nbatch: four\n", "batch must be an integer from 1 to 4096 or auto, got 'four'"),
    ("name: r\nfamily: clip\ncheckpoint: /nonexistent/model\n", "'/nonexistent/model' is not a model directory"),
    ("name: r\nfamily: bert\n", "key 'family' must be one of clip"),
    (DEMO_KEYS + "quantization:\n  weights: per-row\n", "quantization.weights must be one of per-channel, per-tensor"),
    (DEMO_KEYS + "quantization:\n  headroom: 2\n", "quantization.headroom must be in (0, 1]"),
    (DEMO_KEYS + "  images: nowhere\n", "calibration.images"),
    (DEMO_KEYS + "towers: [image, audio]\n", "key 'towers'"),
    (DEMO_KEYS + "flavors: [gpu]\n", "key 'flavors'"),
    ("name: ../escape\n", "plain file name"),
    (DEMO_KEYS + "quantization:\n  smoothing: 1.5\n", "quantization.smoothing must be in (0, 1] or null"),
    (DEMO_KEYS + "quantization:\n  activations: per-tensor\n", "quantization.activations must be one of dynamic"),
    (DEMO_KEYS + "target:\n  top1_agreement: 0.99\n", "unknown key target.top1_agreement (known for clip"),
    (DEMO_KEYS + "target:\n  image_cosine_mean: 1.5\n", "target.image_cosine_mean must be a number in (0, 1]"),
    (DEMO_KEYS + "verify:\n  captions: nowhere.txt\n", "verify.captions"),
    (DEMO_KEYS + "verify:\n  compare: 1\n", "verify.compare must be bool"),
])
def test_recipe_errors_name_recipe_key_and_problem(tmp_path, checkpoint_dir, text, needle):
    path = recipe_file(tmp_path, text.format(ckpt=checkpoint_dir))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert str(path) in str(e.value) and needle in str(e.value)


def test_override_is_validated_too(tmp_path, checkpoint_dir):
    path = recipe_file(tmp_path, DEMO_KEYS.format(ckpt=checkpoint_dir))
    assert load_recipe(path, {"batch": "4"}).batch == 4
    with pytest.raises(RecipeError, match="key 'batch' must be"):
        load_recipe(path, {"batch": "[1, 2]"})


@pytest.mark.parametrize("recipe, section, key", [("recipes/demo-clip.yaml", "calibration", "captions"),
                                                  ("recipes/demo-gemma.yaml", "verify", "prompts")])
def test_a_text_input_without_lines_is_a_recipe_error(tmp_path, recipe, section, key):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    loaded = load_recipe(recipe, {section: f"{{{key}: {empty}}}"})
    with pytest.raises(RecipeError, match=f"key {section}.{key}: {empty} has no {key}"):
        loaded.input_lines(section, key)


def test_doit_refuses_a_bad_recipe_at_once(tmp_path):
    run = doit(tmp_path / "artifacts", f"recipe={recipe_file(tmp_path, 'name: r' + chr(10) + 'bogus: 1')}",
               check=False)
    assert run.returncode != 0 and "unknown key 'bogus'" in run.stderr and "Traceback" not in run.stderr


def _broken_checkpoint(tmp_path, checkpoint_dir, change):
    from safetensors.numpy import load, save
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint_dir, broken)
    tensors = load((broken / "model.safetensors").read_bytes())
    change(tensors)
    (broken / "model.safetensors").write_bytes(save(tensors))
    return broken


def _lying_offsets(broken):
    """The header says one tensor ends 4 bytes later than it does (safetensors must see the overlap)."""
    path = broken / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["vision_model.post_layernorm.bias"]["data_offsets"][1] += 4
    body = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(body) == n
    path.write_bytes(data[:8] + body + data[8 + n :])


def _config_value(broken, key, value):
    config = json.loads((broken / "config.json").read_text())
    config["text_config"][key] = value
    (broken / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change, needle", [
    (lambda t: t.pop("text_model.encoder.layers.1.mlp.fc2.weight"), "'text_model.encoder.layers.1.mlp.fc2.weight' is missing"),
    (lambda t: t.__setitem__("vision_model.encoder.layers.0.self_attn.q_proj.weight", np.zeros((256, 128), np.float32)),
     "has shape [256, 128], the config implies [256, 256]"),
    (lambda t: t["vision_model.post_layernorm.bias"].__setitem__(3, np.nan), "holds NaN or Inf"),
    (lambda t: t["text_model.encoder.layers.0.mlp.fc1.weight"].__setitem__((5, 7), -np.inf), "holds NaN or Inf"),
    (lambda t: t.__setitem__("visual_projection.weight", np.ones((256, 256), np.int32)), "is I32, expected a float type"),
    (lambda t: t.__setitem__("logit_scale", np.array(np.inf, np.float16)), "'logit_scale' holds NaN or Inf"),
    ("lying offsets", "not a valid safetensors file"),
    ("config: hidden_act", "text_config.hidden_act' must be one of"),
    ("config: num_hidden_layers", "text_config.num_hidden_layers' must be from 0 to 1024"),
])
def test_doit_refuses_a_broken_checkpoint_before_long_work(tmp_path, checkpoint_dir, change, needle):
    broken = _broken_checkpoint(tmp_path, checkpoint_dir, change if callable(change) else lambda t: None)
    if change == "lying offsets":
        _lying_offsets(broken)
    elif change == "config: hidden_act":
        _config_value(broken, "hidden_act", "relu6")
    elif change == "config: num_hidden_layers":
        _config_value(broken, "num_hidden_layers", 10**9)
    run = doit(tmp_path / "artifacts", f"checkpoint={broken}", "generate=null", "name=broken", check=False)
    assert run.returncode != 0, run.stdout
    assert needle in run.stdout + run.stderr and str(broken) in run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    # Refused by the first stage that reads it: no template was made, nothing calibrated.
    assert "template:" not in run.stdout and "calibrate" not in run.stderr
    assert not list((tmp_path / "artifacts").glob("cache/uncompiled/*"))
    assert not (tmp_path / "artifacts" / "bundles" / "broken").exists()


def test_runner_errors(tmp_path, bundle_dir, samples):
    not_image = tmp_path / "cat.png"
    not_image.write_text("not an image")
    run = runner("clip-image", bundle_dir, not_image)
    assert run.returncode == 2 and str(not_image) in run.stderr and "cannot read image" in run.stderr

    run = runner("clip-image", tmp_path, samples[0])
    assert run.returncode == 2 and "not a bundle" in run.stderr

    run = runner("clip-image", bundle_dir, samples[0], "--backend", "fp32")
    assert run.returncode == 2 and "--checkpoint" in run.stderr

    run = runner("zero-shot", bundle_dir, samples[0], "--labels", " , ")
    assert run.returncode == 2 and "at least one label" in run.stderr

    run = runner("zero-shot", bundle_dir, samples[0], "--labels", "red,blue,red")
    assert run.returncode == 2 and "'red' is given 2 times" in run.stderr

    run = runner("clip-text", bundle_dir, "red \udcff")  # a byte the locale cannot decode, as Python passes it on
    assert run.returncode == 2 and "not valid Unicode" in run.stderr and "Traceback" not in run.stderr

    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    victim = next((copy / "layers").glob("*.cpu.tflite"))
    victim.unlink()
    run = runner("clip-image", copy, samples[0], "--backend", "cpu")
    assert run.returncode == 2 and str(victim) in run.stderr and "missing" in run.stderr
    # Start-up checks the files its backend opens: emulate runs without the cpu flavor.
    assert runner("clip-image", copy, samples[0], "--backend", "emulate").returncode == 0
    for run in (runner("clip-image", bundle_dir, samples[0]), runner("clip-text", bundle_dir, "a cat")):
        assert "Traceback" not in run.stderr


def test_image_f32le_equals_the_png_path(tmp_path, bundle_dir, samples):
    from runner.images import load_image
    raw = tmp_path / "red.f32"
    raw.write_bytes(load_image(samples[0], 64).astype("<f4").tobytes())
    a = runner("clip-image", bundle_dir, samples[0], "--out", tmp_path / "a.npy")
    b = runner("clip-image", bundle_dir, raw, "--image-f32le", "--out", tmp_path / "b.npy")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def test_a_bundle_given_by_name_gets_its_path_suggested(tmp_path, bundle_dir, samples):
    """`runner zero-shot demo-clip ...` where the bundle is artifacts/bundles/demo-clip (the
    build host), bundles/demo-clip (a Pi after `doit deploy`) or under CORAL_ARTIFACTS."""
    env = {k: v for k, v in os.environ.items() if k != "CORAL_ARTIFACTS"} | {"PYTHONPATH": str(ROOT)}

    def run_in(cwd, **extra):
        return subprocess.run([sys.executable, "-m", "runner", "zero-shot", "demo-clip", samples[0], "--labels", "a,b"],
                              cwd=cwd, env=env | extra, capture_output=True, text=True, timeout=300)

    for parent in ("artifacts/bundles", "bundles"):
        place = tmp_path / parent.replace("/", "-")
        (place / parent).mkdir(parents=True)
        (place / parent / "demo-clip").symlink_to(bundle_dir)
        run = run_in(place)
        assert run.returncode == 2 and run.stderr == (f"error: demo-clip: not a bundle (no manifest.json); "
                                                      f"did you mean {parent}/demo-clip?\n"), run.stderr
    run = run_in(tmp_path, CORAL_ARTIFACTS=str(bundle_dir.parent.parent))
    assert f"did you mean {bundle_dir}?" in run.stderr
    run = run_in(tmp_path)  # nowhere: how to make one
    assert run.stderr == "error: demo-clip: not a bundle (no manifest.json; build one with doit)\n"


def test_out_into_a_missing_directory_names_the_path_given(tmp_path, bundle_dir, samples):
    """It used to name the temporary file beside it (tmpXXXX.npy.tmp), after the forward pass."""
    target = tmp_path / "missing" / "emb.npy"
    run = runner("clip-image", bundle_dir, samples[0], "--out", target)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.splitlines()[-1].endswith(f"argument --out: {target}: the directory {target.parent} does not "
                                                "exist") and ".tmp" not in run.stderr
    run = runner("clip-text", bundle_dir, "a cat", "--out", tmp_path / "emb.npy")
    assert run.returncode == 0 and np.load(tmp_path / "emb.npy").shape == (1, 256)
    assert (tmp_path / "emb.npy").stat().st_mode & 0o777 == 0o666 & ~current_umask()
    assert [p.name for p in tmp_path.iterdir()] == ["emb.npy"]  # no temporary file left


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_doit_builds_and_verifies_a_checkpoint_whose_start_of_text_is_0(tmp_path, demo, checkpoint_dir):
    """Special tokens first in the vocabulary: build and `doit verify` both stopped at
    `ValueError: high <= 0` drawing synthetic texts."""
    first = specials_first(checkpoint_dir, tmp_path / "first")
    artifacts = warm_artifacts(demo, tmp_path)
    args = [f"checkpoint={first}", "generate=null", "name=first", "towers=[text]",
            "verify={captions: heldout-captions.txt, synthetic: 2, compare: false}"]
    run = doit(artifacts, *args, "verify")
    assert ".  layers" in run.stdout and ".  verify" in run.stdout
    report = json.loads((artifacts / "bundles" / "first" / "report.json").read_text())
    assert report["metrics"]["text_cosine_mean"] > 0.99


def test_an_overflow_in_calibration_is_one_line_through_doit(tmp_path, demo, checkpoint_dir):
    """Finite weights whose product overflows float32: `NonFiniteError` from the float model
    during calibration, one line naming the checkpoint, no traceback."""
    name = "vision_model.encoder.layers.0.mlp.fc2.weight"
    broken = _broken_checkpoint(tmp_path, checkpoint_dir, lambda t: t.__setitem__(name, t[name] * np.float32(1e37)))
    run = doit(warm_artifacts(demo, tmp_path), f"checkpoint={broken}", "generate=null", "name=broken", check=False)
    out = run.stdout + run.stderr
    assert run.returncode != 0 and "Traceback" not in out
    assert ".  layers" in run.stdout and "TaskFailed - taskid:layers" in run.stdout
    line = next(line for line in out.splitlines() if "hold NaN or Inf" in line)
    assert str(broken) in line and "calibration" in line


def test_the_demo_recipe_pointed_at_another_checkpoint(tmp_path, checkpoint_dir):
    """`doit checkpoint=DIR` with the demo recipe: its generator must not replace DIR's model,
    and the calibration inputs DIR lacks are one line naming the key and the fix (it was a
    bare `[Errno 2] No such file or directory: '.../calibration'` from the layer stage)."""
    from prepare.demo_models import generate
    from runner.errors import UserError
    other = tmp_path / "other"
    other.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(checkpoint_dir / name, other)
    before = {p.name: p.read_bytes() for p in other.iterdir()}

    run = doit(tmp_path / "artifacts", f"checkpoint={other}", "generate=demo-clip", check=False)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert (f"key 'checkpoint': '{other}' holds a model of its own, which 'generate: demo-clip' would replace "
            "with a generated one; to build that model, add generate=null") in run.stderr
    with pytest.raises(UserError, match="did not make; not replacing it"):
        generate("demo-clip", other)
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before

    run = doit(tmp_path / "artifacts", f"checkpoint={other}", "generate=null", check=False)
    assert run.returncode == 2 and "Traceback" not in run.stderr and len(run.stderr.splitlines()) == 1
    assert (f"key calibration.images: {other / 'calibration'} does not exist (calibration paths are relative "
            f"to the checkpoint {other} unless they start with recipes/ or artifacts/): name a directory of "
            "images of your own in the recipe, or on the command line: calibration='{images: PATH, synthetic: 8}' "
            "(it replaces the whole calibration mapping)") in run.stderr
    # The fix it names is taken.
    recipe = load_recipe(None, {"checkpoint": str(other), "generate": "null", "verify": "{synthetic: 4}",
                                "calibration": f"{{images: {checkpoint_dir / 'calibration'}, synthetic: 8}}"})
    assert recipe.input_path("calibration", "images") == checkpoint_dir / "calibration"


@pytest.mark.parametrize("recipe, repo", [("recipes/clip-vit-b32.yaml", "openai/clip-vit-base-patch32"),
                                          ("recipes/functiongemma-270m.yaml", "google/functiongemma-270m-it"),
                                          ("recipes/siglip-base-patch16-224.yaml", "google/siglip-base-patch16-224")])
def test_a_missing_checkpoint_prints_its_download_command(tmp_path, recipe, repo):
    """The recipes said `huggingface-cli download` (gone from huggingface_hub, now `hf
    download`), and a missing checkpoint directory said only that it had no config.json."""
    missing = tmp_path / "nowhere"
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe, {"checkpoint": str(missing)})
    hf = hf_program()
    assert str(e.value) == (
        f"{recipe}: key 'checkpoint': '{missing}' is not a model directory (no config.json there); download it "
        f"there: {hf} download {repo} --include '*.json' --include '*.safetensors' --include '*.model' --local-dir {missing} "
        f"(if the "
        f"model is gated, as Gemma is: accept its licence at https://huggingface.co/{repo} and run `{hf} auth login` "
        "first)")
    # The recipe's comment, the README and the recipe's own checkpoint key say the same.
    text = (ROOT / recipe).read_text()
    checkpoint = yaml.safe_load(text)["checkpoint"]
    assert checkpoint.startswith("checkpoints/") and "huggingface-cli" not in text
    command = f"hf download {repo} --include '*.json' --include '*.safetensors' --include '*.model'"
    assert command in text and f"--local-dir {checkpoint}" in text
    assert f"{command} --local-dir {checkpoint}" in (ROOT / "README.md").read_text()


def test_the_download_command_names_an_hf_the_shell_can_run(tmp_path, monkeypatch):
    """It said `hf download ...`, but `hf` is in .venv/bin/, which the README's commands never
    put on PATH: the shell said `hf: command not found`."""
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(sys, "executable", str(venv / "python"))
    monkeypatch.chdir(tmp_path)
    assert download_command("a/b", "ck").startswith("venv/bin/pip install huggingface_hub && venv/bin/hf download a/b ")
    (venv / "hf").write_text("")
    command = download_command("a/b", "ck")
    assert command.startswith("venv/bin/hf download a/b ") and "run `venv/bin/hf auth login` first" in command
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "hf").write_text("")
    (tmp_path / "empty" / "hf").chmod(0o755)
    assert download_command("a/b", "ck").startswith("hf download a/b ")


def test_hf_repo_is_checked(tmp_path, checkpoint_dir):
    with pytest.raises(RecipeError, match="key 'hf_repo' must be a Hugging Face model id"):
        load_recipe(recipe_file(tmp_path, DEMO_KEYS.format(ckpt=checkpoint_dir) + "hf_repo: 'a b'\n"))
    with pytest.raises(RecipeError, match="key 'hf_repo' needs a model"):
        load_recipe(recipe_file(tmp_path, "name: t\nhf_repo: openai/clip-vit-base-patch32\n"))
