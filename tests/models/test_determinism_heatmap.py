"""Untrained mode is identical across processes; overlays stay small enough for FHIR."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

from PIL import Image

from models.classifier import Classifier
from models.preprocess import decode_image

_SCRIPT = """
import hashlib, sys
from models.factory import load_classifier
c = load_classifier("untrained", backend="torch", tta=True)
h = hashlib.sha256()
for a in c.analyze(sys.argv[1:]):
    h.update(a.cams.tobytes()); h.update(a.features.tobytes())
    for f in a.findings: h.update(repr((f.logit, f.band_low, f.band_high)).encode())
print(c.model_version, h.hexdigest())
"""


def test_untrained_identical_across_processes(nih_images: list[Path]) -> None:
    root = Path(__file__).resolve().parents[2]
    args = [sys.executable, "-c", _SCRIPT, *map(str, nih_images[:2])]
    procs = [
        subprocess.Popen(args, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        outs.append(out.strip().splitlines()[-1])
    assert outs[0] == outs[1]
    assert outs[0].startswith("untrained-")


def test_overlay_png_small_and_sized(torch_classifier: Classifier, nih_images: list[Path]) -> None:
    from models.heatmap import overlay_png

    decoded = decode_image(nih_images[0])
    (analysis,) = torch_classifier.analyze([decoded])
    data = overlay_png(decoded, analysis.cams[0], size=512)
    assert len(data) <= 100_000
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG" and img.size == (512, 512)


def test_overlay_pngs_draw_what_overlay_png_draws(
    torch_classifier: Classifier, nih_images: list[Path]
) -> None:
    """The serving renderer (one resize, a fixed palette, one encode per PNG) shows the same
    picture as the reference renderer: the same hot region, the radiograph where the map
    is transparent, and PNGs small enough for FHIR."""
    import numpy as np

    from models.heatmap import overlay_png, overlay_pngs

    decoded = decode_image(nih_images[0])
    (analysis,) = torch_classifier.analyze([decoded])
    fast = overlay_pngs(decoded, analysis.cams[:3], size=512)
    assert len(fast) == 3
    for k, data in enumerate(fast):
        assert len(data) <= 100_000
        img = Image.open(io.BytesIO(data))
        assert img.format == "PNG" and img.size == (512, 512) and img.mode == "P"
        a = np.asarray(img.convert("RGB"), dtype=np.float64)
        ref = Image.open(io.BytesIO(overlay_png(decoded, analysis.cams[k], size=512)))
        b = np.asarray(ref.convert("RGB"), dtype=np.float64)
        # colour where the map shows: red minus blue, same sign pattern in both
        ha, hb = a[..., 0] - a[..., 2], b[..., 0] - b[..., 2]
        assert np.corrcoef(ha.ravel(), hb.ravel())[0, 1] > 0.8
        assert float(np.abs(a - b).mean()) < 12.0  # of 255: palette steps, not another picture
    assert overlay_pngs(decoded, analysis.cams[:0]) == []
    assert overlay_pngs(decoded, analysis.cams[:1], size=256)[0] != fast[0]
