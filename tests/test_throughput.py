"""The Pi 5 + Coral throughput model of the benchmarks (bench/throughput.py): the work it
counts on a real forward, and the properties its estimates must have."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bench.throughput import Counter, Device, LinearWork, best_batch, recommend
from prepare.costmodel import DEVICE_FILE
from runner.load import load


def test_counter_records_the_rows_every_linear_sees(bundle_dir):
    loaded = load(bundle_dir, "emulate")
    model, bundle = loaded.model, loaded.bundle
    counter = Counter(bundle)
    model.linear = counter.wrap(model.linear)
    v = model.config.vision
    model.image_features(np.zeros((2, 3, v.image_size, v.image_size), np.float32))
    work = counter.reset()
    tokens = (v.image_size // v.patch_size) ** 2 + 1  # patches and the class token
    layers = {layer.name: layer for layer in bundle.layers}
    assert set(work.linears) == {n for n in layers if n.startswith(("vision_model.", "visual_projection"))}
    for name, w in work.linears.items():
        assert w.calls == ([2] if name == "visual_projection" else [2 * tokens]), name
        assert w.param_bytes == layers[name].files["params"].path.stat().st_size
        assert w.batch == layers[name].batch
    assert not counter.work.linears  # reset starts a new count


def test_estimates_move_the_way_the_hardware_does():
    device = Device.load()
    layer = LinearWork("l", 768, 768, 4, 768 * 768 + 4 * 768, [50])
    assert layer.invocations() == 13 and layer.invocations(64) == 1
    faster_usb = dataclasses.replace(device, usb_bytes_per_s=device.usb_bytes_per_s * 10)
    assert layer.tpu_s(faster_usb) < layer.tpu_s(device)
    # Parameters over the on-chip memory cross USB at every invoke, not once per call.
    small_sram = dataclasses.replace(device, sram_bytes=1000)
    extra = layer.tpu_s(small_sram) - layer.tpu_s(device)
    assert extra == pytest.approx(12 * layer.param_bytes / device.usb_bytes_per_s)
    # Two calls of one layer (other layers ran between them) upload its parameters twice.
    twice = LinearWork("l", 768, 768, 4, layer.param_bytes, [50, 50])
    assert twice.tpu_s(device) == pytest.approx(2 * layer.tpu_s(device))


def test_batch_and_placement_recommendations():
    device = Device.load()
    group = [LinearWork(f"l{i}", 768, 768, 4, 768 * 768, [50]) for i in range(3)]
    best, seconds = best_batch(group, device)
    assert seconds <= sum(w.tpu_s(device) for w in group)
    assert best >= 50  # one invoke per call: the invoke overhead dominates 13 small ones
    tight = dataclasses.replace(device, activation_budget_bytes=16 * (768 + 768))
    assert best_batch(group, tight)[0] <= 16
    # One row through a big matrix: streaming its parameters over USB costs more than the CPU's
    # pass over float weights in memory, so the CPU is recommended; 4096 rows go to the TPU.
    decode = LinearWork("d", 640, 2048, 1, 640 * 2048, [1])
    batch = LinearWork("b", 640, 2048, 64, 640 * 2048, [4096])
    from bench.throughput import Work
    rec = recommend(Work(linears={"d": decode, "b": batch}), device)
    assert rec["faster_on_cpu"] == ["d"]


def test_device_file_is_checked(tmp_path):
    bad = tmp_path / "device.yaml"
    bad.write_text("usb_bytes_per_s: -1\n")
    with pytest.raises(ValueError, match="device.yaml"):
        Device.load(bad)
    text = DEVICE_FILE.read_text().replace("usb_bytes_per_s: 320.0e+6", "usb_bytes_per_s: 0")
    bad.write_text(text)
    with pytest.raises(ValueError, match="usb_bytes_per_s must be a positive number"):
        Device.load(bad)


def test_a_missing_peer_is_skipped_with_a_line(monkeypatch, capsys):
    """`doit bench` without the bench extra: each peer says it is skipped, and nothing runs."""
    import bench.run

    monkeypatch.setattr(bench.run.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(bench.run.subprocess, "run", lambda *a, **k: pytest.fail("a missing peer was run"))
    for model, (_, _, what, _) in bench.run.PEERS.items():
        assert bench.run.run_peers(model, "2026-01-01", {}) is None
        line = capsys.readouterr().out
        assert f"{what} is not installed, skipping it for {model}" in line and "[test,bench]" in line
