"""The import contracts (``make lint`` runs them) must name every roof module.

A layers contract only checks the modules it lists: a new ``fhir_service`` module missing
from the roof list could be imported from ``subscriptions/`` and nobody would notice.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import fhir_service

REPO = Path(__file__).resolve().parents[1]


def _contract(contract_id: str) -> dict[str, object]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    return next(c for c in config["contracts"] if c["id"] == contract_id)


def test_the_roof_layer_names_every_module_of_fhir_service_but_the_ground_packages() -> None:
    layers = _contract("floors")["layers"]
    assert isinstance(layers, list)
    roof = {name.strip() for name in layers[0].split(":")}
    ground = {name.strip() for name in layers[-1].split(":")}
    package = Path(fhir_service.__file__).parent
    children = {
        f"fhir_service.{p.stem if p.is_file() else p.name}"
        for p in package.iterdir()
        if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()
    }
    assert {"fhir_service.fhir", "fhir_service.dicom"} <= ground
    assert children - {"fhir_service.fhir", "fhir_service.dicom"} == roof


def test_the_floors_are_roof_middle_ground() -> None:
    layers = _contract("floors")["layers"]
    assert isinstance(layers, list)
    assert layers[1] == "subscriptions"
    assert {n.strip() for n in layers[2].split(":")} == {
        "fhir_service.fhir",
        "fhir_service.dicom",
        "models",
        "vector_store",
    }
