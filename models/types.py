"""Result types of the one-pass model. Plain data, no torch: builders and stores read these."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

#: The 14 NIH ChestX-ray14 findings, in the order every result uses.
NIH_FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)


@dataclass(frozen=True)
class FindingScore:
    """One finding of one image. Numbers are named for what they are."""

    finding: str
    logit: float
    sigmoid_score: float
    calibrated_probability: float
    band_low: float
    band_high: float
    threshold: float
    """operating threshold on ``calibrated_probability``"""
    calibrated: bool = False
    """False: no calibration was fitted for this finding, and ``calibrated_probability`` is the
    sigmoid score itself — outputs must call it an "uncalibrated score", never a probability"""
    band_kind: str = "none"
    """what ``band_low``..``band_high`` is: ``BAND_KINDS``"""

    @property
    def positive(self) -> bool:
        return self.calibrated_probability >= self.threshold

    @property
    def has_band(self) -> bool:
        return self.band_kind != "none"


#: "none": no band was computed (low = high = the score); "tta-spread": the spread over
#: augmented views of the image, not a confidence interval; "calibration": the calibration
#: fit's 95 % band; "calibration+tta": both together.
BAND_KINDS = ("none", "tta-spread", "calibration", "calibration+tta")


@dataclass(frozen=True)
class ImageAnalysis:
    """Everything one forward pass gives for one image."""

    findings: tuple[FindingScore, ...]
    """the 14 NIH findings, in ``NIH_FINDINGS`` order"""
    cams: npt.NDArray[np.float32]
    """[14, 7, 7] class activation maps (without bias), same order as ``findings``"""
    cam_bias: npt.NDArray[np.float32]
    """[14] classifier bias: mean(cams[k]) + cam_bias[k] == findings[k].logit"""
    features: npt.NDArray[np.float32]
    """[1024] pooled DenseNet feature vector"""
    model_version: str
    """weights name + sha256 prefix (+ calibration version); contains 'untrained' when so"""
    untrained: bool
    extra_findings: dict[str, float] = field(default_factory=dict)
    """labels beyond the 14 (e.g. from the -all weights): label -> sigmoid_score"""
    weights_sha256: str = ""
    """sha256 of the loaded weights file (of the parameters when untrained)"""

    def finding(self, name: str) -> FindingScore:
        for f in self.findings:
            if f.finding == name:
                return f
        raise KeyError(name)


@dataclass(frozen=True)
class ZeroShotTag:
    """One finding's CLIP zero-shot tag for one image."""

    finding: str
    score: float
    """softmax over (finding prompts, 'no finding' prompts) at CLIP's logit scale, in [0, 1]"""
    similarity: float
    """cosine similarity of the image to the finding's mean prompt embedding"""


@dataclass(frozen=True)
class ClipAnalysis:
    """CLIP's view of one image: a normalised embedding and zero-shot tags."""

    embedding: npt.NDArray[np.float32]
    """[512] L2-normalised image embedding"""
    tags: tuple[ZeroShotTag, ...]
    """one per finding, highest score first"""
    model_version: str
    """contains 'untrained' when so"""
    untrained: bool
