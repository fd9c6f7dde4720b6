"""The demo's triage table: an untrained model's numbers never read as findings."""

from __future__ import annotations

from pathlib import Path

import pytest

from fhir_service.cli.demo import _print_triage
from fhir_service.settings import Settings


def _rows() -> list[dict[str, object]]:
    band = {"low": {"value": 0.81}, "high": {"value": 0.86}}
    return [
        {
            "study": "7",
            "image": "00000013_005.png",
            "report": "9",
            "urgency": 0.84,
            "findings": [("Edema", 0.84, band, True), ("Mass", 0.31, None, False)],
        }
    ]


@pytest.mark.parametrize("untrained", [True, False])
def test_the_table_says_what_the_numbers_are(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], untrained: bool
) -> None:
    version = "untrained-densenet121-res224-nih-seed0@ab" if untrained else "densenet121-nih@ab"
    _print_triage(_rows(), Settings(data_dir=tmp_path), version)
    out = capsys.readouterr().out
    assert "Edema 0.84 [0.81–0.86]" in out
    if untrained:
        assert "UNTRAINED — NOT FINDINGS" in out and "not findings." in out
        assert "POS" not in out and "top findings" not in out
        assert "≥ threshold" in out
    else:
        assert "Triage" in out and "top findings" in out and "Edema 0.84 [0.81–0.86] POS" in out
