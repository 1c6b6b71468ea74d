"""Shared test fixtures. The real compiled template lives outside the repository."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures" / "edgetpu"


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
