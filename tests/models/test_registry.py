"""Weights resolution: the torchxrayvision cache path, sha256 pins, clear start-up errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_errors import ConfigError, ModelError
from models._xrv import xrv
from models.factory import load_classifier
from models.registry import REGISTRY, file_sha256, get_spec, resolve_weights
from models.types import NIH_FINDINGS


def _pickled_model(cache: Path, name: str) -> Path:
    """What torchxrayvision's download leaves: a whole pickled model under the URL's name."""
    spec = REGISTRY[name]
    torch.manual_seed(1)
    path = cache / spec.filename
    torch.save(xrv.models.DenseNet(weights=None, num_classes=len(spec.labels)), path)
    return path


def test_loads_from_cache_dir(tmp_path: Path) -> None:
    path = _pickled_model(tmp_path, "densenet121-res224-nih")
    loaded = resolve_weights("densenet121-res224-nih", cache_dir=tmp_path, allow_download=False)
    assert not loaded.untrained
    assert loaded.sha256 == file_sha256(path)
    assert loaded.model_version == f"densenet121-res224-nih@{loaded.sha256[:12]}"
    assert loaded.model.op_threshs is not None
    assert not loaded.model.training


def test_explicit_file_path_and_all_labels(tmp_path: Path) -> None:
    path = _pickled_model(tmp_path, "densenet121-res224-all")
    classifier = load_classifier(str(path), backend="torch", tta=False)
    assert classifier.spec.name == "densenet121-res224-all"
    (analysis,) = classifier.analyze([torch.zeros(1, 224, 224)])
    assert [f.finding for f in analysis.findings] == list(NIH_FINDINGS)
    assert set(analysis.extra_findings) == {
        "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
    }  # fmt: skip
    # thresholds come from torchxrayvision's operating points, not 0.5
    assert not np.allclose([f.threshold for f in analysis.findings], 0.5)


def test_sha256_mismatch_is_refused(tmp_path: Path) -> None:
    _pickled_model(tmp_path, "densenet121-res224-nih")
    with pytest.raises(ConfigError, match=r"has sha256 .* expected 0{64}"):
        resolve_weights("densenet121-res224-nih", cache_dir=tmp_path, sha256="0" * 64)


def test_missing_weights_name_file_dir_and_remedy(tmp_path: Path) -> None:
    spec = get_spec("densenet121-res224-nih")
    with pytest.raises(ConfigError) as info:
        resolve_weights("densenet121-res224-nih", cache_dir=tmp_path, allow_download=False)
    message = info.value.message
    assert spec.filename in message and str(tmp_path) in message
    assert "CXR_WEIGHTS_CACHE_DIR" in message and "untrained" in message


def test_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither a registry name"):
        resolve_weights(str(tmp_path / "nope.pt"))


def test_untrained_says_so() -> None:
    loaded = resolve_weights("untrained")
    assert loaded.untrained and loaded.model_version.startswith("untrained-")


class _Payload:
    """Anything outside the DenseNet's own classes: what a malicious pickle would construct."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("unpickled code ran",))


def test_a_file_that_needs_more_than_weights_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = REGISTRY["densenet121-res224-nih"]
    model = xrv.models.DenseNet(weights=None, num_classes=len(spec.labels))
    model.payload = _Payload()  # type: ignore[assignment]
    torch.save(model, tmp_path / spec.filename)
    with pytest.raises(ModelError, match=r"refused.*arbitrary code.*state_dict"):
        resolve_weights("densenet121-res224-nih", cache_dir=tmp_path, allow_download=False)
    assert "unpickled code ran" not in capsys.readouterr().out


def test_a_plain_state_dict_loads(tmp_path: Path) -> None:
    spec = REGISTRY["densenet121-res224-nih"]
    model = xrv.models.DenseNet(weights=None, num_classes=len(spec.labels))
    torch.save(model.state_dict(), tmp_path / "mine.pt")
    loaded = resolve_weights(str(tmp_path / "mine.pt"))
    assert loaded.spec.name == "densenet121-res224-nih"
    assert loaded.sha256 == file_sha256(tmp_path / "mine.pt")


def test_output_count_must_match_the_registry_entry(tmp_path: Path) -> None:
    spec = REGISTRY["densenet121-res224-nih"]
    torch.save(xrv.models.DenseNet(weights=None, num_classes=14), tmp_path / spec.filename)
    with pytest.raises(ModelError, match="has 14 outputs but densenet121-res224-nih has 18"):
        resolve_weights("densenet121-res224-nih", cache_dir=tmp_path, allow_download=False)


def test_all_weights_under_the_nih_name_are_refused(tmp_path: Path) -> None:
    nih, all_ = REGISTRY["densenet121-res224-nih"], REGISTRY["densenet121-res224-all"]
    model = xrv.models.DenseNet(weights=None, num_classes=len(all_.labels))
    model.pathologies = list(all_.labels)  # type: ignore[assignment]
    torch.save(model, tmp_path / nih.filename)
    with pytest.raises(ModelError, match=r"outputs .*Lung Lesion.* not densenet121-res224-nih"):
        resolve_weights("densenet121-res224-nih", cache_dir=tmp_path, allow_download=False)
    # the same file under a name of its own is recognised by the labels it lists
    torch.save(model, tmp_path / "renamed.pt")
    assert resolve_weights(str(tmp_path / "renamed.pt")).spec.name == "densenet121-res224-all"
