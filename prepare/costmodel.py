"""The cost model of a Raspberry Pi 5 with a Coral USB Accelerator: what one linear's calls
cost on the TPU and on the CPU, from the device's figures in `bench/pi5_coral.yaml` (a
user edits them and rebuilds).

The build uses it to record, per layer, the rows per call from which the TPU is cheaper
(`tpu_from_rows`, runner `--route auto`); bench/throughput.py adds up whole runs with it.
The model is simple on purpose, and says what it assumes:

- a TPU layer's parameters (under 8 MiB: cached on chip) cross USB once per call, since
  other layers run between two calls of one layer; larger ones at every invoke;
- each invoke pays the overhead, its rows' input and output bytes over USB, and
  batch x in x out multiply-accumulates (padding rows included);
- CPU work is matrix products (at the MAC rate or the memory rate, whichever is slower)
  plus element-wise work; TPU and CPU do not overlap (the runner is sequential).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from runner.errors import UserError

ROOT = Path(__file__).resolve().parent.parent  # not prepare.store's: importing it fixes the artifacts directory

DEVICE_FILE = ROOT / "bench" / "pi5_coral.yaml"
BATCH_CANDIDATES = (1, 2, 4, 8, 16, 25, 32, 50, 64, 100, 128, 200, 256, 400)  # template batches considered
ROUTE_LIMIT = 4096  # rows per call up to which `tpu_from_rows` looks for the TPU to be cheaper


class DeviceError(UserError):
    """A device file (bench/pi5_coral.yaml) that cannot be used."""


@dataclass(frozen=True)
class Device:
    usb_bytes_per_s: float
    invoke_overhead_s: float
    tpu_macs_per_s: float
    sram_bytes: float
    activation_budget_bytes: float
    cpu_macs_per_s: float
    cpu_bytes_per_s: float
    cpu_elements_per_s: float
    host_to_pi_cpu: float
    reference: dict

    @classmethod
    def load(cls, path: Path = DEVICE_FILE) -> "Device":
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise DeviceError(f"{path}: cannot read the device figures ({str(e).splitlines()[0]})") from e
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) != names:
            raise DeviceError(f"{path}: needs exactly the keys {sorted(names)}")
        for k, v in data.items():
            if k != "reference" and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
                raise DeviceError(f"{path}: {k} must be a positive number, got {v!r}")
        return cls(**data)


@dataclass
class LinearWork:
    """One linear's calls in a run: the rows of each call."""
    name: str
    n_in: int
    n_out: int
    batch: int  # its template's rows per invoke (0 for a layer kept on the host)
    param_bytes: int  # what the TPU receives (the bundle's parameter file)
    calls: list[int] = field(default_factory=list)

    @property
    def on_tpu(self) -> bool:
        return self.batch > 0

    def invocations(self, batch: int | None = None) -> int:
        b = batch or self.batch
        return sum(-(-rows // b) for rows in self.calls)

    def tpu_s(self, device: Device, batch: int | None = None) -> float:
        b = batch or self.batch
        invokes = self.invocations(b)
        uploads = len(self.calls) if self.param_bytes <= device.sram_bytes else invokes
        per_invoke = (device.invoke_overhead_s + b * (self.n_in + self.n_out) / device.usb_bytes_per_s
                      + b * self.n_in * self.n_out / device.tpu_macs_per_s)
        return uploads * self.param_bytes / device.usb_bytes_per_s + invokes * per_invoke + self.row_glue_s(device)

    def row_glue_s(self, device: Device) -> float:
        """The host's quantizing of input rows and dequantizing of output rows, either side."""
        return sum(self.calls) * (self.n_in + self.n_out) / device.cpu_elements_per_s

    def cpu_s(self, device: Device, weight_bytes: int = 4) -> float:
        """On the CPU: each call streams the weights once (float32: 4 bytes a weight)."""
        weights = self.n_in * self.n_out
        return sum(max(rows * weights / device.cpu_macs_per_s, weight_bytes * weights / device.cpu_bytes_per_s)
                   for rows in self.calls)

    def cpu_int8_s(self, device: Device) -> float:
        """As the `cpu` flavor runs it: int8 weights (one byte each) through the interpreter,
        with the same quantizing and dequantizing of rows as the TPU side."""
        return self.cpu_s(device, weight_bytes=1) + self.row_glue_s(device)


def tpu_from_rows(n_in: int, n_out: int, batch: int, param_bytes: int, device: Device) -> int | None:
    """The fewest rows in one call from which the layer's call costs less on the TPU
    (parameter upload, invokes of `batch` rows) than on the CPU (its `cpu` flavor); None
    when the CPU is cheaper all the way to ROUTE_LIMIT rows. The costs are steps, not
    lines (invokes come in whole batches), so this is the first crossing found by rows."""
    for rows in range(1, ROUTE_LIMIT + 1):
        work = LinearWork("", n_in, n_out, batch, param_bytes, [rows])
        if work.tpu_s(device) < work.cpu_int8_s(device):
            return rows
    return None


def best_batch(group: list[LinearWork], device: Device) -> tuple[int, float]:
    """The template batch (rows per invoke) that runs these same-shape layers fastest, and its seconds."""
    n_in, n_out = group[0].n_in, group[0].n_out
    allowed = [b for b in BATCH_CANDIDATES if b * (n_in + n_out) <= device.activation_budget_bytes] or [1]
    times = {b: sum(w.tpu_s(device, b) for w in group) for b in allowed}
    best = min(times, key=lambda b: (round(times[b], 6), b))
    return best, times[best]
