"""The runner's Python packages, imported where they are first needed, and what to say when
one is missing (numpy, which every module imports, is checked first in runner/__main__.py).

Each is optional in the sense that a run which does not need it starts without it (text
without Pillow, images without tokenizers). A missing one is `MissingPackageError`: the
package, what it is for, and the command that installs it into the Python that runs the
runner. Without that, `ModuleNotFoundError` surfaced inside other errors and read as a
corrupt file (`host.safetensors: not a valid safetensors file (No module named
'safetensors')`).

Raspberry Pi OS Bookworm refuses `pip install` into its system Python
(externally-managed-environment), so the set-up is a virtual environment: `PI_SETUP`,
which `doit deploy` prints and the README gives.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from .errors import UserError

VENV = "~/coral-venv"
PI_SETUP = f"python3 -m venv {VENV} && {VENV}/bin/pip install -r runner/requirements.txt"
PIP_NAMES = {"PIL": "pillow", "ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime"}


class MissingPackageError(UserError):
    """A Python package the runner needs here is not installed; the message says how to install it."""


def in_virtualenv() -> bool:
    return sys.prefix != sys.base_prefix


def install_command(package: str) -> str:
    """The command that installs `package` (a pip name) for this Python: its own pip in a
    virtual environment; else the virtual environment the README sets up, since a system
    Python may refuse pip (Raspberry Pi OS Bookworm does)."""
    if in_virtualenv():
        return f"{sys.executable} -m pip install {package}"
    return f"{PI_SETUP} (a system Python may refuse pip), then run {VENV}/bin/python -m runner"


def missing(module: str, purpose: str) -> MissingPackageError:
    package = PIP_NAMES.get(module.split(".")[0], module.split(".")[0])
    return MissingPackageError(f"the Python package {package} is not installed ({purpose}); install it with: "
                               f"{install_command(package)}")


def available(module: str) -> bool:
    """Whether `module` imports here (imported, not only found: a package whose own
    dependencies are missing is not available)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def require(module: str, purpose: str) -> ModuleType:
    """`module` imported, or MissingPackageError naming its package and `purpose` (what needs it)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:  # the package, or one it imports
        raise missing(e.name or module, purpose) from e
