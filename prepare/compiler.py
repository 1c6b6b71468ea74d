"""Drive `edgetpu_compiler` through its documented command line and read its report.

    edgetpu_compiler --version
    edgetpu_compiler -s -o OUT_DIR [FLAGS] MODEL.tflite  ->  OUT_DIR/MODEL_edgetpu.tflite (+ .log)

The report (stdout with `-s`) says how many operations reached the TPU, in how many
subgraphs, and how much parameter memory is cached on chip or streamed over USB.
A template is useful only if its FULLY_CONNECTED runs on the TPU, in one subgraph.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from runner.errors import UserError

DEFAULT_COMPILER = "edgetpu_compiler"
TIMEOUT_S = 600
_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


class CompilerError(UserError):
    """The compiler is missing, failed, or left the Dense layer off the TPU."""


class StreamingWarning(UserWarning):
    """Parameters would be streamed over USB at every invocation (slow)."""


@dataclass
class CompilerReport:
    version: str = ""
    subgraphs: int | None = None
    operations: int | None = None
    on_chip_bytes: int | None = None
    streamed_bytes: int | None = None
    ops: dict[str, str] = field(default_factory=dict)  # operator -> status
    log: str = ""


def _bytes(text: str) -> int:
    m = re.fullmatch(r"([\d.]+)\s*(B|KiB|MiB|GiB)", text.strip())
    if not m:
        raise ValueError(f"unreadable size {text!r}")
    return int(round(float(m.group(1)) * _UNITS[m.group(2)]))


def parse_report(text: str) -> CompilerReport:
    r = CompilerReport(log=text)
    patterns = {
        "version": r"Edge TPU Compiler version (\S+)",
        "subgraphs": r"Number of Edge TPU subgraphs:\s*(\d+)",
        "operations": r"Total number of operations:\s*(\d+)",
        "on_chip_bytes": r"On-chip memory used for caching model parameters:\s*(\S+)",
        "streamed_bytes": r"Off-chip memory used for streaming uncached model parameters:\s*(\S+)",
    }
    for name, pattern in patterns.items():
        m = re.search(pattern, text)
        if m:
            value = m.group(1)
            setattr(r, name, value if name == "version" else
                    int(value) if name in ("subgraphs", "operations") else _bytes(value))
    # The operator table: "FULLY_CONNECTED   1   Mapped to Edge TPU"
    for m in re.finditer(r"^([A-Z][A-Z0-9_]+)\s+(\d+)\s+(\S.*?)\s*$", text, re.MULTILINE):
        r.ops[m.group(1)] = m.group(3)
    return r


def find_compiler(configured: str | None = None) -> str | None:
    """The compiler's path: a configured name or path, else `edgetpu_compiler` on PATH."""
    return shutil.which(configured or DEFAULT_COMPILER)


def compiler_version(compiler: str) -> str:
    try:
        run = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CompilerError(f"{compiler} --version failed: {e}") from e
    m = re.search(r"version (\S+)", run.stdout + run.stderr)
    if run.returncode != 0 or not m:
        raise CompilerError(f"{compiler} --version said: {(run.stdout + run.stderr).strip()!r}")
    return m.group(1)


def compile_model(compiler: str, model: bytes, name: str, flags: list[str] = ()) -> tuple[bytes, CompilerReport]:
    """Compile one uncompiled template; return the compiled bytes and the parsed report."""
    with tempfile.TemporaryDirectory(prefix="edgetpu-") as tmp:
        src = Path(tmp) / f"{name}.tflite"
        src.write_bytes(model)
        out_dir = Path(tmp) / "out"
        out_dir.mkdir()
        cmd = [compiler, "-s", "-o", str(out_dir), *flags, str(src)]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise CompilerError(f"{' '.join(cmd)}: {e}") from e
        log_file = out_dir / f"{name}_edgetpu.log"
        text = run.stdout + run.stderr + (("\n" + log_file.read_text(errors="replace")) if log_file.is_file() else "")
        report = parse_report(text)
        compiled = out_dir / f"{name}_edgetpu.tflite"
        own_lines = "\n".join("    " + line for line in text.strip().splitlines())
        if run.returncode != 0 or not compiled.is_file():
            raise CompilerError(f"edgetpu_compiler rejected {name} (exit {run.returncode}):\n{own_lines}")
        status = report.ops.get("FULLY_CONNECTED", "")
        if "Mapped to Edge TPU" not in status or report.subgraphs not in (None, 1):
            raise CompilerError(f"edgetpu_compiler left FULLY_CONNECTED of {name} off the Edge TPU "
                                f"({status or 'not in its report'}, {report.subgraphs} subgraphs):\n{own_lines}")
        if report.streamed_bytes:
            warnings.warn(f"{name}: {report.streamed_bytes} bytes of parameters would be streamed over USB "
                          "at every invocation; a smaller template (or LM-head tile) stays on chip",
                          StreamingWarning, stacklevel=2)
        return compiled.read_bytes(), report
