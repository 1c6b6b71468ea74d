"""A throughput model of a Raspberry Pi 5 with a Coral USB Accelerator, applied to the
work a run really does.

The work is counted, not assumed: `Counter` wraps a model's `linear(name, x)` while it
runs a forward pass on this machine and records, per linear, the rows of every call;
the bundle's manifest gives each layer's template batch and parameter bytes. The
family's attention products and the LM head are added by the bench script that knows
their shapes. The device is `pi5_coral.yaml`: USB bandwidth, invoke overhead, TPU and
CPU rates; what one linear's calls cost, and what the model assumes, is
prepare/costmodel.py (the build routes calls with the same model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from prepare.costmodel import BATCH_CANDIDATES, DEVICE_FILE as PARAMETERS, Device, LinearWork, best_batch

__all__ = ["BATCH_CANDIDATES", "PARAMETERS", "Device", "LinearWork", "Work", "Counter", "cpu_head_work",
           "best_batch", "recommend"]


@dataclass
class Work:
    """Everything one run (a forward, a decode step) asked of the hardware."""
    linears: dict[str, LinearWork] = field(default_factory=dict)
    cpu_macs: float = 0.0  # matrix products on the CPU besides host linears (attention)
    cpu_bytes: float = 0.0  # weights the CPU streams besides host linears (an int8 LM head)
    cpu_elements: float = 0.0  # element-wise work besides quantizing rows
    head_tiles: list[LinearWork] = field(default_factory=list)  # LM-head tiles run on the TPU

    def tpu_layers(self) -> list[LinearWork]:
        return [w for w in list(self.linears.values()) + self.head_tiles if w.on_tpu]

    def summary(self) -> dict:
        tpu = self.tpu_layers()
        host = [w for w in self.linears.values() if not w.on_tpu]
        return {"param_bytes_uploaded": sum(w.param_bytes * len(w.calls) for w in tpu),
                "tpu_invocations": sum(w.invocations() for w in tpu),
                "tpu_macs": sum(w.invocations() * w.batch * w.n_in * w.n_out for w in tpu),
                "tpu_macs_useful": sum(sum(w.calls) * w.n_in * w.n_out for w in tpu),
                "cpu_macs": self.cpu_macs + sum(sum(w.calls) * w.n_in * w.n_out for w in host),
                "host_linears": len(host), "tpu_linears": len(tpu)}

    def estimate(self, device: Device) -> dict:
        """Seconds on the device: TPU side (USB, invokes, MACs, row quantization) and CPU side."""
        tpu = sum(w.tpu_s(device) for w in self.tpu_layers())
        usb = sum(w.param_bytes * len(w.calls) for w in self.tpu_layers()) / device.usb_bytes_per_s
        cpu = (sum(w.cpu_s(device) for w in self.linears.values() if not w.on_tpu)
               + max(self.cpu_macs / device.cpu_macs_per_s, self.cpu_bytes / device.cpu_bytes_per_s)
               + self.cpu_elements / device.cpu_elements_per_s)
        return {"total_s": tpu + cpu, "tpu_s": tpu, "of_which_parameter_upload_s": usb, "cpu_s": cpu}


class Counter:
    """Wraps `linear(name, x)` and records each call's rows against the bundle's layers."""

    def __init__(self, bundle):
        self.bundle = bundle
        self.work = Work()

    def reset(self) -> Work:
        work, self.work = self.work, Work()
        return work

    def layer_work(self, layer) -> LinearWork:
        tpu = layer.placement == "tpu"
        return LinearWork(layer.name, layer.n_in, layer.n_out, layer.batch if tpu else 0,
                          layer.files["params"].bytes if tpu else 0)

    def wrap(self, linear):
        """`linear` counted; a fused layer's parts (asked for one by one, on one input) are one
        call of the fused layer, as runner/nn.py `with_fused` runs them."""
        layers = {layer.name: layer for layer in self.bundle.layers}
        fused = {part: layer for layer in self.bundle.layers for part, _ in layer.parts}
        last = {}  # fused layer -> the input it last ran on

        def counted(name, x):
            layer = fused.get(name) or layers[name]
            if layer.parts and last.get(layer.name) is x:
                return linear(name, x)
            last[layer.name] = x
            if layer.name not in self.work.linears:
                self.work.linears[layer.name] = self.layer_work(layer)
            self.work.linears[layer.name].calls.append(math.prod(x.shape[:-1]))
            return linear(name, x)
        return counted


def cpu_head_work(table_elements: int) -> Work:
    """One row through the int8 table as the runner's `cpu` head does it (and `--rescore`
    for a few rows): each int8 row is read, widened to float32, and multiplied."""
    return Work(cpu_macs=table_elements, cpu_bytes=table_elements, cpu_elements=table_elements)


def recommend(work: Work, device: Device) -> dict:
    """Template batch per shape, then which linears the CPU would run faster than the TPU
    even at those batches, and where the LM head is faster."""
    shapes: dict[tuple[int, int], list[LinearWork]] = {}
    for w in work.linears.values():
        if w.on_tpu:
            shapes.setdefault((w.n_in, w.n_out), []).append(w)
    batches, best = [], {}
    for (n_in, n_out), group in sorted(shapes.items()):
        b, seconds = best_batch(group, device)
        best.update({w.name: b for w in group})
        batches.append({"shape": f"{n_in}x{n_out}", "layers": len(group), "rows_per_call": group[0].calls[0],
                        "batch_now": group[0].batch, "s_now": sum(w.tpu_s(device) for w in group),
                        "batch_best": b, "s_best": seconds})
    tpu = [w for w in work.linears.values() if w.on_tpu]
    faster_on_cpu = [w.name for w in tpu if w.cpu_s(device) < w.tpu_s(device, best[w.name])]
    saved = sum(w.tpu_s(device, best[w.name]) - w.cpu_s(device) for w in tpu if w.name in faster_on_cpu)
    head = None
    if work.head_tiles:
        tiles_s = sum(w.tpu_s(device) for w in work.head_tiles)
        cpu_head_s = cpu_head_work(sum(w.n_in * w.n_out for w in work.head_tiles)).estimate(device)["total_s"]
        head = {"tpu_tiles_s": tiles_s, "cpu_int8_s": cpu_head_s, "faster": "cpu" if cpu_head_s < tiles_s else "tpu"}
    return {"batches": batches, "faster_on_cpu": faster_on_cpu, "of_tpu_linears": len(tpu),
            "seconds_saved": saved, "head": head}
