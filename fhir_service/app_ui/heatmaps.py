"""On-demand heatmaps for findings the worker stored none for.

The worker stores overlay ``Media`` only for positive findings, and CAMs are not stored in
FHIR. For any other finding the service recomputes them: the same weights and the same
pixels give the same one DenseNet pass (``CAM_k = w_k · relu(F) + b_k``), so the overlay is
what the worker would have drawn. The classifier comes from the process's one lazy holder
(:class:`fhir_service.runtime.LazyModels`: loaded on the first such request, once), and
rendered overlays are kept in a small LRU cache.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from cxr_errors import NotFoundError
from fhir_service.runtime import LazyModels

_CACHE_SIZE = 64


class HeatmapRenderer:
    def __init__(self, models: LazyModels) -> None:
        self._models = models
        self._run_lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], bytes] = OrderedDict()

    def render(self, image: bytes, finding: str) -> bytes:
        """The overlay PNG of ``finding`` on ``image`` (blocking: call it in a thread)."""
        from models.heatmap import overlay_pngs
        from models.preprocess import decode_image

        key = (hashlib.sha256(image).hexdigest(), finding)
        with self._run_lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
            model = self._models.classifier()
            pre = model.preprocess
            decoded = decode_image(
                image, max_bytes=pre.max_image_bytes, max_pixels=pre.max_image_pixels, name="study"
            )
            analysis = model.analyze([decoded])[0]
            labels = [f.finding for f in analysis.findings]
            if finding not in labels:
                raise NotFoundError(f"the model has no finding {finding!r}")
            # One pass gives every finding's CAM: cache them all for the next clicks.
            for label, png in zip(labels, overlay_pngs(decoded, analysis.cams), strict=True):
                self._cache[(key[0], label)] = png
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
            return self._cache[key]
