"""Shared fixtures for the model tests: the shared data, one untrained classifier per backend.

Session-scoped: loading a model costs seconds and the full suite shares two
cores with HAPI and PostgreSQL.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from models.classifier import Classifier
from models.factory import load_classifier


@pytest.fixture(scope="session")
def shared_data(shared_dir: Path) -> Path:
    # tests/conftest.py's shared_dir fails the run when the data is missing: never a skip.
    return shared_dir / "data"


@pytest.fixture(scope="session")
def nih_dir(shared_data: Path) -> Path:
    return shared_data / "nih-sample"


@pytest.fixture(scope="session")
def dicom_dir(shared_data: Path) -> Path:
    return shared_data / "dicom"


@pytest.fixture(scope="session")
def nih_rows(nih_dir: Path) -> list[dict[str, str]]:
    with (nih_dir / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="session")
def nih_images(nih_dir: Path, nih_rows: list[dict[str, str]]) -> list[Path]:
    """A handful of real NIH images: a 512 px one, 1024 px ones and an RGBA one."""
    by_mode: dict[str, list[Path]] = {}
    for row in nih_rows:
        by_mode.setdefault(f"{row['png_mode']}{row['png_width']}", []).append(nih_dir / row["file"])
    picks = [
        *by_mode.get("L1024", [])[:2],
        *by_mode.get("L512", [])[:1],
        *by_mode.get("RGBA1024", [])[:1],
    ]
    return picks


@pytest.fixture(scope="session")
def torch_classifier() -> Classifier:
    return load_classifier("untrained", backend="torch", tta=False)


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="session")
def onnx_classifier(onnx_cache: Path) -> Classifier:
    return load_classifier("untrained", backend="onnx", onnx_cache_dir=onnx_cache, tta=True)
