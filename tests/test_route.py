"""`--route`: each TPU layer's calls go, by their rows, to the side the build's cost model
says is cheaper (prepare/costmodel.py `tpu_from_rows`, runner/executors.py `make_linear`).
Here `emulate` stands for the TPU, as it does for every test without a Coral."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import yaml

from prepare.costmodel import DEVICE_FILE, ROUTE_LIMIT, Device, LinearWork, tpu_from_rows

from .conftest import doit, runner, warm_artifacts

# A device on which a 256x256 layer's upload costs about 14 rows of CPU work: single
# captions (a few rows per call) stay on the CPU, images (dozens of rows) go to the TPU.
FAST_USB = {"usb_bytes_per_s": 1.0e9, "invoke_overhead_s": 1.0e-6, "cpu_macs_per_s": 1.0e10}


def costs(shape, device, rows):
    work = LinearWork("", *shape[:2], shape[2], shape[3], [rows])
    return work.tpu_s(device), work.cpu_int8_s(device)


@pytest.mark.parametrize("shape", [(256, 256, 1, 66560), (640, 2048, 64, 1318912), (768, 3072, 4, 2371584)])
def test_tpu_from_rows_is_the_first_row_count_at_which_the_tpu_is_cheaper(shape):
    pi5 = Device.load(DEVICE_FILE)
    for device in (pi5, dataclasses.replace(pi5, **FAST_USB)):
        found = tpu_from_rows(*shape, device)
        cheaper = [r for r in range(1, ROUTE_LIMIT + 1) if np.less(*costs(shape, device, r))]
        assert found == (cheaper[0] if cheaper else None)
    # what the device figures say moves the answer: with a fast link, small layers pay off sooner
    assert (tpu_from_rows(*shape, dataclasses.replace(pi5, **FAST_USB)) or ROUTE_LIMIT + 1) <= \
        (tpu_from_rows(*shape, pi5) or ROUTE_LIMIT + 1)


def write_device(path, **changes):
    figures = yaml.safe_load(DEVICE_FILE.read_text())
    path.write_text(yaml.safe_dump({**figures, **changes}))


def routes(*args):
    run = runner(*args, "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(run.stdout)


@pytest.fixture(scope="module")
def routed(demo, tmp_path_factory):
    """The demo CLIP built with a cost model of a fast link: (artifacts, bundle, device file)."""
    tmp = tmp_path_factory.mktemp("route")
    artifacts, device = warm_artifacts(demo, tmp), tmp / "device.yaml"
    write_device(device, **FAST_USB)
    doit(artifacts, f"cost_model={device}")
    return artifacts, artifacts / "bundles" / "demo-clip", device


def test_auto_sends_image_calls_to_the_tpu_and_a_caption_to_the_cpu(routed, samples, tmp_path):
    _, bundle, device = routed
    manifest = json.loads((bundle / "manifest.json").read_text())
    tpu_layers = [e for e in manifest["layers"] if e["placement"] == "tpu"]
    thresholds = {e["tpu_from_rows"] for e in tpu_layers}
    assert manifest["route"]["cost_model"] == str(device) and len(thresholds) == 1  # one shape, one threshold
    (threshold,) = thresholds
    check = routes("check", bundle, "--quick")
    assert check["routes"]["tpu_from_rows"] == {str(threshold): len(tpu_layers)}

    image = routes("clip-image", bundle, samples[0], "--backend", "emulate", "--route", "auto",
                   "--out", tmp_path / "auto.npy")
    tpu_side, cpu_side = image["routes"]["emulate"], image["routes"]["cpu"]
    # the encoder's calls (every patch's row) to the TPU; the projection of one pooled row to the CPU
    assert tpu_side["rows"] >= threshold * tpu_side["calls"] and cpu_side == {"calls": 1, "rows": 1}
    text = routes("clip-text", bundle, "a red circle", "--backend", "emulate", "--route", "auto")
    assert "emulate" not in text["routes"] and text["routes"]["cpu"]["rows"] < threshold * text["routes"]["cpu"]["calls"]

    # the same answer either side: the cpu flavor is the same int8 layer through TFLite's kernels
    routes("clip-image", bundle, samples[0], "--backend", "emulate", "--route", "cpu", "--out", tmp_path / "cpu.npy")
    routes("clip-image", bundle, samples[0], "--backend", "emulate", "--route", "tpu", "--out", tmp_path / "tpu.npy")
    auto, cpu, tpu = (np.load(tmp_path / f"{r}.npy", allow_pickle=False) for r in ("auto", "cpu", "tpu"))
    np.testing.assert_allclose(auto, tpu, rtol=0, atol=1e-6)
    cos = float((cpu * tpu).sum() / np.linalg.norm(cpu) / np.linalg.norm(tpu))
    assert cos > 0.9999


def test_editing_the_cost_model_rebuilds_the_routes(routed):
    artifacts, bundle, device = routed
    write_device(device)  # back to the Pi 5 figures: one-row invokes never pay off for 256x256
    out = doit(artifacts, f"cost_model={device}").stdout
    assert "bundle:" in out
    manifest = json.loads((bundle / "manifest.json").read_text())
    expected = {tpu_from_rows(e["in"], e["out"], e["batch"], e["files"]["params"]["bytes"], Device.load(device))
                for e in manifest["layers"] if e["placement"] == "tpu"}
    assert {e["tpu_from_rows"] for e in manifest["layers"] if e["placement"] == "tpu"} == expected
    assert manifest["route"]["device"]["invoke_overhead_s"] == Device.load(DEVICE_FILE).invoke_overhead_s


def test_routes_need_a_bundle_with_both_flavors(demo, tmp_path, samples):
    artifacts = warm_artifacts(demo, tmp_path)
    doit(artifacts, "flavors=[cpu]")
    bundle = artifacts / "bundles" / "demo-clip"
    assert json.loads((bundle / "manifest.json").read_text())["route"] is None
    run = runner("clip-image", bundle, samples[0], "--backend", "emulate", "--route", "auto")
    assert run.returncode == 2 and "built without routes" in run.stderr and "Traceback" not in run.stderr


def test_a_bad_cost_model_is_one_line_naming_it(demo, tmp_path):
    artifacts, device = warm_artifacts(demo, tmp_path), tmp_path / "device.yaml"
    write_device(device, usb_bytes_per_s=-1)
    run = doit(artifacts, f"cost_model={device}", check=False)
    assert run.returncode != 0 and f"{device}: usb_bytes_per_s must be a positive number" in run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr
