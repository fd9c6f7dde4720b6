"""Weights registry and loader: name → labels, input size, preprocessing, sha256.

Architectures are data here (open_clip style); :func:`models.factory.load_classifier`
returns the model *together with* its preprocessing so the two cannot drift.

Resolution order for a registry name (``CXR_MODEL_WEIGHTS``):

1. an explicit file path (``CXR_MODEL_WEIGHTS=/path/to/file.pt``),
2. the file named after the weights URL in torchxrayvision's cache directory
   (``~/.torchxrayvision/models_data/`` unless ``CXR_WEIGHTS_CACHE_DIR`` is set),
3. torchxrayvision's own download into that directory.

When none works the error names the file, the directory and how to provide it.
``untrained`` is the explicit, seeded, deterministic mode for tests and demos;
everything it produces says "untrained".
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import pickle
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from cxr_errors import ConfigError, ModelError
from models.preprocess import (
    PreprocessSpec,
)
from models.types import NIH_FINDINGS

__all__ = [
    "DEFAULT_WEIGHTS",
    "REGISTRY",
    "UNTRAINED",
    "UNTRAINED_SEED",
    "LoadedWeights",
    "WeightsSpec",
    "build_untrained_densenet",
    "default_cache_dir",
    "file_sha256",
    "get_spec",
    "resolve_weights",
    "state_dict_sha256",
]

log = logging.getLogger(__name__)

UNTRAINED = "untrained"
UNTRAINED_SEED = 0
DEFAULT_WEIGHTS = "densenet121-res224-nih"

_XRV_BASE = "https://github.com/mlmed/torchxrayvision/releases/download/v1/"


@dataclass(frozen=True)
class WeightsSpec:
    """Everything the code needs to know about one weights file."""

    name: str
    labels: tuple[str, ...]
    """model outputs in order; '' marks an empty slot (always 0.5 in torchxrayvision)"""
    op_threshs: tuple[float, ...] | None
    """torchxrayvision's per-output operating points on sigmoid(logit); NaN for empty slots"""
    url: str
    sha256: str | None = None
    """pin for the file; None = not pinned: no published hash could be checked here, so the
    loaded file's sha256 is recorded (model version, Device, Provenance) but not enforced;
    set CXR_WEIGHTS_SHA256 to pin it"""
    preprocessing: PreprocessSpec = field(default_factory=PreprocessSpec)

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def input_size(self) -> int:
        return self.preprocessing.input_size

    def finding_index(self) -> tuple[int, ...]:
        """Model output index of each of the 14 ``NIH_FINDINGS``."""
        try:
            return tuple(self.labels.index(f) for f in NIH_FINDINGS)
        except ValueError as exc:
            raise ModelError(f"weights {self.name} lack an NIH finding: {exc}") from exc

    def extra_index(self) -> tuple[tuple[str, int], ...]:
        """Labels beyond the 14 (e.g. 'Lung Opacity' in the -all weights), with their index."""
        return tuple(
            (label, i) for i, label in enumerate(self.labels) if label and label not in NIH_FINDINGS
        )


_NIH_LABELS = (
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema",
    "Fibrosis", "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule",
    "Mass", "Hernia", "", "", "", "",
)  # fmt: skip
_NAN = float("nan")

REGISTRY: dict[str, WeightsSpec] = {
    spec.name: spec
    for spec in (
        WeightsSpec(
            name="densenet121-res224-nih",
            labels=_NIH_LABELS,
            op_threshs=(
                0.039117552,
                0.0034529066,
                0.11396341,
                0.0057298196,
                0.00045666535,
                0.0018880932,
                0.012037827,
                0.038744126,
                0.0037213727,
                0.014730946,
                0.016149804,
                0.054241467,
                0.037198864,
                0.0004403434,
                _NAN,
                _NAN,
                _NAN,
                _NAN,
            ),
            url=_XRV_BASE + "nih-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
        ),
        WeightsSpec(
            name="densenet121-res224-all",
            labels=(
                *_NIH_LABELS[:14],
                "Lung Lesion",
                "Fracture",
                "Lung Opacity",
                "Enlarged Cardiomediastinum",
            ),
            op_threshs=(
                0.07422872,
                0.038290843,
                0.09814756,
                0.0098118475,
                0.023601074,
                0.0022490358,
                0.010060724,
                0.103246614,
                0.056810737,
                0.026791653,
                0.050318155,
                0.023985857,
                0.01939503,
                0.042889766,
                0.053369623,
                0.035975814,
                0.20204692,
                0.05015312,
            ),
            url=_XRV_BASE + "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121"
            "-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
        ),
    )
}


def get_spec(name: str) -> WeightsSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join([*REGISTRY, UNTRAINED])
        raise ConfigError(
            f"unknown model weights {name!r}: use one of {known}, or a path to a weights file"
        ) from None


def default_cache_dir() -> Path:
    """torchxrayvision's cache directory (it has no environment variable of its own)."""
    return Path("~/.torchxrayvision/models_data").expanduser()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_dict_sha256(module: nn.Module) -> str:
    """A content hash of the parameters and buffers (stable across processes and files)."""
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(str(tensor.dtype).encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class LoadedWeights:
    """A torchxrayvision DenseNet in eval mode plus where it came from."""

    model: nn.Module
    spec: WeightsSpec
    sha256: str
    """sha256 of the weights file, or of the parameters in untrained mode"""
    source: str
    """file path, or 'untrained (seed 0)'"""
    untrained: bool

    @property
    def model_version(self) -> str:
        if self.untrained:
            return f"untrained-{self.spec.name}-seed{UNTRAINED_SEED}@{self.sha256[:12]}"
        return f"{self.spec.name}@{self.sha256[:12]}"


def resolve_weights(
    weights: str = DEFAULT_WEIGHTS,
    *,
    cache_dir: Path | None = None,
    sha256: str | None = None,
    allow_download: bool = True,
) -> LoadedWeights:
    """Load DenseNet weights by registry name, file path or ``untrained`` (see module doc)."""
    from models._xrv import xrv

    if weights == UNTRAINED:
        model = build_untrained_densenet(get_spec(DEFAULT_WEIGHTS))
        return LoadedWeights(
            model=model,
            spec=get_spec(DEFAULT_WEIGHTS),
            sha256=state_dict_sha256(model),
            source=f"untrained (seed {UNTRAINED_SEED})",
            untrained=True,
        )

    named: WeightsSpec | None = None
    if weights in REGISTRY:
        spec = REGISTRY[weights]
        folder = (cache_dir or default_cache_dir()).expanduser()
        path = folder / spec.filename
        if not path.is_file():
            if not allow_download:
                raise _missing_weights(spec, path, "downloading is disabled")
            _download(spec, folder, path, xrv)
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"model weights {weights!r} are neither a registry name "
                f"({', '.join([*REGISTRY, UNTRAINED])}) nor an existing file"
            )
        named = next((s for s in REGISTRY.values() if s.filename == path.name), None)
        spec = named or get_spec(DEFAULT_WEIGHTS)

    digest = file_sha256(path)
    pin = sha256 or spec.sha256
    if pin is not None and digest != pin.lower():
        raise ConfigError(
            f"weights file {path} has sha256 {digest}, expected {pin.lower()} "
            "(CXR_WEIGHTS_SHA256); replace the file or correct the pin"
        )
    model, spec = _load_file(path, spec, xrv, infer_spec=weights not in REGISTRY and named is None)
    return LoadedWeights(model=model, spec=spec, sha256=digest, source=str(path), untrained=False)


def _missing_weights(spec: WeightsSpec, path: Path, why: str) -> ConfigError:
    return ConfigError(
        f"model weights {spec.name!r} not found: looked for {path.name} in {path.parent} ({why}). "
        f"Provide them by downloading {spec.url} to {path}, or set CXR_WEIGHTS_CACHE_DIR to the "
        "directory holding that file, or CXR_MODEL_WEIGHTS to the file's path "
        "(or CXR_MODEL_WEIGHTS=untrained for an explicit untrained demo model)"
    )


def _download(spec: WeightsSpec, folder: Path, path: Path, xrv: object) -> None:
    log.info("downloading %s to %s", spec.url, path)
    try:
        # torchxrayvision prints its progress; keep stdout clean for the CLI's --json
        with contextlib.redirect_stdout(io.StringIO()):
            xrv.models.get_weights(spec.name, cache_dir=str(folder))  # type: ignore[attr-defined]
    except Exception as exc:  # requests / urllib errors of every kind
        with contextlib.suppress(OSError):
            if path.is_file() and path.stat().st_size == 0:
                path.unlink()
        raise _missing_weights(spec, path, f"download failed: {type(exc).__name__}") from exc
    if not path.is_file():
        raise _missing_weights(spec, path, "download produced no file")


def _safe_globals(model: nn.Module) -> list[Any]:
    """What a pickled torchxrayvision DenseNet may construct: its own module classes, no more."""
    return [*sorted({type(m) for m in model.modules()}, key=str), OrderedDict, set]


def _read_weights(path: Path, model: nn.Module) -> object:
    """``torch.load(weights_only=True)``, never the full unpickler.

    torchxrayvision ships whole pickled models; the restricted unpickler rebuilds them with an
    allowlist of exactly the DenseNet's own module classes. A file that needs anything else
    could run code while it loads, so it is refused, saying what it asked for.
    """
    try:
        with torch.serialization.safe_globals(_safe_globals(model)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = str(exc).strip().splitlines()
        asked = next((line.strip() for line in detail if "GLOBAL" in line), detail[0][:200])
        raise ModelError(
            f"weights file {path} is refused: loading it needs more than tensors and the "
            f"DenseNet's own module classes ({asked}), and unpickling anything else can run "
            "arbitrary code. Where you trust the file, re-save it as a state_dict "
            "(torch.save(model.state_dict(), new_path)) and point CXR_MODEL_WEIGHTS at that"
        ) from exc
    except Exception as exc:
        raise ModelError(f"weights file {path} could not be read: {exc}") from exc


def _check_outputs(path: Path, obj: object, state: dict[str, Any], spec: WeightsSpec) -> None:
    """The file's outputs must be the registry entry's: count, and labels when it has them."""
    weight = state.get("classifier.weight")
    outputs = int(weight.shape[0]) if isinstance(weight, torch.Tensor) else None
    if outputs != len(spec.labels):
        raise ModelError(
            f"weights file {path} has {outputs} outputs but {spec.name} has "
            f"{len(spec.labels)} ({', '.join(x or '-' for x in spec.labels)}); "
            "name the registry entry these weights belong to"
        )
    labels = getattr(obj, "pathologies", None)
    if labels is not None and tuple(str(x) for x in labels) != spec.labels:
        raise ModelError(
            f"weights file {path} outputs {list(labels)}, not {spec.name}'s {list(spec.labels)}; "
            "name the registry entry these weights belong to"
        )


def _load_file(
    path: Path, spec: WeightsSpec, xrv: object, *, infer_spec: bool = False
) -> tuple[nn.Module, WeightsSpec]:
    """The model and its registry entry. ``infer_spec``: a bare file path whose name is not a
    registry file; a pickled model that lists its labels then picks the entry with those."""
    model: nn.Module = xrv.models.DenseNet(weights=None, num_classes=len(spec.labels))  # type: ignore[attr-defined]
    obj = _read_weights(path, model)
    state = obj.state_dict() if isinstance(obj, nn.Module) else obj
    if not isinstance(state, dict):
        raise ModelError(f"{path}: holds a {type(obj).__name__}, not a model or state_dict")
    labels = getattr(obj, "pathologies", None)
    if infer_spec and labels is not None:
        listed = tuple(str(x) for x in labels)
        spec = next((s for s in REGISTRY.values() if s.labels == listed), spec)
    _check_outputs(path, obj, state, spec)
    try:
        model.load_state_dict(state)
    except Exception as exc:
        raise ModelError(f"weights file {path} could not be loaded: {exc}") from exc
    _annotate(model, spec)
    return model.eval(), spec


def _annotate(model: nn.Module, spec: WeightsSpec) -> None:
    """Set what torchxrayvision sets when it loads weights itself."""
    model.pathologies = list(spec.labels)  # type: ignore[assignment]
    model.targets = list(spec.labels)  # type: ignore[assignment]
    model.weights = spec.name  # type: ignore[assignment]
    model.input_resolution = spec.input_size  # type: ignore[assignment]
    if spec.op_threshs is not None:
        model.op_threshs = torch.tensor(spec.op_threshs)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_untrained_densenet(spec: WeightsSpec, seed: int = UNTRAINED_SEED) -> nn.Module:
    """A seeded random DenseNet whose logits have a sensible scale.

    Raw kaiming-initialised DenseNets give logits in the thousands (every score
    0 or 1), which makes demos and CAM tests meaningless, so BatchNorm statistics
    are set from one seeded batch of noise and the classifier gets a small random
    bias. Deterministic for a given torch version.
    """
    from models._xrv import xrv

    with _seeded(seed):
        model: nn.Module = xrv.models.DenseNet(weights=None, num_classes=len(spec.labels))
        probe = torch.rand(8, 1, spec.input_size, spec.input_size) * 2048.0 - 1024.0
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for bn in bns:
            bn.momentum = None  # cumulative average: one batch sets the statistics exactly
        model.train()
        with torch.no_grad():
            model.features2(probe)  # type: ignore[operator]
        for bn in bns:
            bn.momentum = 0.1
        classifier = model.classifier
        assert isinstance(classifier, nn.Linear)
        with torch.no_grad():
            classifier.weight.mul_(0.5)
            classifier.bias.copy_(torch.randn(classifier.bias.shape) * 0.5)
    _annotate(model, spec)
    model.op_threshs = None  # type: ignore[assignment]  # untrained: no operating points
    return model.eval()


BackendName = Literal["onnx", "openvino", "torch"]
