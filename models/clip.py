"""CLIP (open_clip) image and text embeddings, and zero-shot tags per finding.

Weights follow the classifier's rules: ``weights=None`` loads the ``pretrained``
tag (open_clip's hub download), a path loads that file (optionally sha256
pinned), ``untrained`` is a seeded random model whose outputs say so; the factory
is :func:`models.factory.load_clip`.

Prompt embeddings are computed once per (weights, prompt set) and cached on
disk: one prompt costs ~43 ms on two CPU cores.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from cxr_errors import ConfigError, ModelError
from models.clip_serving import clip_session
from models.onepass import load_or_export, ort_session, release_module
from models.precision_gate import GateReport
from models.preprocess import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    DecodedImage,
    ImageSource,
    center_square,
    decode_image,
)
from models.reduced import Precision, Requested, Runtime, auto_precision
from models.registry import BackendName
from models.types import NIH_FINDINGS, ClipAnalysis, ZeroShotTag

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_CLIP_PRETRAINED",
    "FINDING_PROMPTS",
    "NEGATIVE_PROMPTS",
    "ClipEncoder",
    "ClipPreprocess",
]

log = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "laion2b_s34b_b79k"
_HUB_HOST = "huggingface.co"

_READABLE = {"Pleural_Thickening": "pleural thickening"}

#: finding → prompts that describe it (their mean embedding is the finding's text vector)
FINDING_PROMPTS: dict[str, tuple[str, ...]] = {
    f: (
        f"a chest x-ray showing {_READABLE.get(f, f.lower())}",
        f"a chest radiograph with {_READABLE.get(f, f.lower())}",
    )
    for f in NIH_FINDINGS
}
#: the contrast class every finding is scored against
NEGATIVE_PROMPTS: tuple[str, ...] = (
    "a normal chest x-ray",
    "a chest radiograph with no abnormality",
)


class ClipPreprocess:
    """Decoded grayscale → CLIP input [3, S, S]: centre square, bicubic resize, mean/std."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size = size
        self.mean = torch.tensor(list(mean), dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(list(std), dtype=torch.float32)[:, None, None]

    def __call__(self, image: DecodedImage) -> torch.Tensor:
        top, left, side = center_square(image.height, image.width)
        square = torch.from_numpy(
            np.ascontiguousarray(image.pixels[top : top + side, left : left + side])
        )[None, None]
        if side != self.size:
            square = F.interpolate(
                square, size=(self.size, self.size), mode="bicubic", antialias=True
            ).clamp_(0.0, 1.0)
        rgb = square[0].expand(3, -1, -1)  # a radiograph is gray: the same value in R, G, B
        return (rgb - self.mean) / self.std


class _ImageTower(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.visual = model.visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.visual(x)  # type: ignore[operator]
        return F.normalize(features, dim=-1)


class ClipEncoder:
    """An open_clip model with its preprocessing, tokenizer and cached prompt embeddings."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        preprocess: ClipPreprocess,
        *,
        model_version: str,
        untrained: bool,
        weights_sha256: str,
        backend: BackendName = "torch",
        cache_dir: Path | None = None,
        num_threads: int | None = None,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        precision: Requested = "fp32",
        gate_images: Sequence[Path] = (),
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.model_version = model_version
        self.untrained = untrained
        self.weights_sha256 = weights_sha256
        self.cache_dir = cache_dir
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.logit_scale = float(getattr(model, "logit_scale", torch.tensor(0.0)).detach().exp())
        self.tower = _ImageTower(model).eval()
        self._session: Any = None
        self.gate_report: GateReport | None = None
        self._finding_vectors, self._negative_vector = self._prompt_vectors()
        self.backend: BackendName = backend
        """the runtime that serves the image tower (``auto`` resolved)"""
        self.precision: Precision = "fp32"
        """the arithmetic that serves it (``auto`` resolved)"""
        if backend in ("onnx", "openvino"):
            self._serve_graph(backend, precision, num_threads, gate_images)
        elif backend != "torch":
            raise ConfigError(
                f"unknown CLIP backend {backend!r}: use 'onnx', 'openvino' or 'torch'"
            )
        elif precision not in ("fp32", "auto"):
            raise ConfigError("the torch CLIP backend is the fp32 reference: use onnx or openvino")

    def _serve_graph(
        self,
        backend: Runtime,
        precision: Requested,
        num_threads: int | None,
        gate_images: Sequence[Path],
    ) -> None:
        """The image tower as an exported graph (checked against torch at start-up), in
        ``precision`` once the precision gate passed."""
        size = self.preprocess.size
        source = load_or_export(
            self.tower,
            torch.zeros(1, 3, size, size),
            ["embedding"],
            cache_dir=self.cache_dir,
            prefix="clip-image",
            weights_sha256=self.weights_sha256,
        )
        fp32 = self._session = ort_session(source, num_threads)
        self._check_against_torch(source)

        def build(runtime: Runtime, served: Precision) -> tuple[Any, GateReport | None]:
            return clip_session(
                fp32,
                source,
                runtime=runtime,
                precision=served,
                weights_sha256=self.weights_sha256,
                num_threads=num_threads,
                gate_images=(
                    (lambda: self.prepare(list(gate_images)).numpy()) if gate_images else None
                ),
                tag_scores=self._tag_scores,
            )

        if precision == "auto":
            served, backend, self.precision = auto_precision("CLIP", backend, build)
        else:
            served, self.precision = build(backend, precision), precision
        self._session, self.gate_report = served
        self.backend = backend
        if backend == "openvino" and self.precision == "fp32":
            self._check_against_torch(source)

    def release_torch(self) -> int:
        """Free the torch model (both towers) once a graph serves the image tower and the
        prompt vectors are computed: the worker never embeds text. Bytes freed; afterwards
        ``embed_texts`` raises :class:`~cxr_errors.ModelError`."""
        if self._session is None:
            return 0
        self._released = True
        return release_module(self.model)

    def _check_against_torch(self, source: object, atol: float = 1e-3) -> None:
        """Start-up check, as for the DenseNet graph: a wrong image tower never serves.

        One seeded probe through both; the embeddings are unit vectors, so the largest
        absolute difference is already on a common scale.
        """
        size = self.preprocess.size
        probe = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1234))
        probe = (probe - self.preprocess.mean) / self.preprocess.std
        with torch.inference_mode():
            reference = self.tower(probe).numpy()
        (got,) = self._session.run(None, {"x": np.ascontiguousarray(probe.numpy(), np.float32)})
        err = float(np.abs(np.asarray(got) - reference).max())
        if not err <= atol:
            where = source if isinstance(source, Path) else "(memory)"
            raise ModelError(
                f"ONNX CLIP image tower {where} disagrees with torch: max error {err:.2e} > "
                f"{atol:g}; delete the cached graph to re-export it"
            )

    # ------------------------------------------------------------ embeddings

    def prepare(self, images: Sequence[DecodedImage | ImageSource]) -> torch.Tensor:
        decoded = [
            img
            if isinstance(img, DecodedImage)
            else decode_image(img, max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)
            for img in images
        ]
        return torch.stack([self.preprocess(d) for d in decoded])

    def embed_batch(self, x: torch.Tensor) -> npt.NDArray[np.float32]:
        """[B,3,S,S] preprocessed → [B,512] L2-normalised embeddings."""
        if self._session is not None:
            (raw,) = self._session.run(None, {"x": np.ascontiguousarray(x.numpy(), np.float32)})
            emb: npt.NDArray[np.float32] = np.asarray(raw, dtype=np.float32)
            return emb
        with torch.inference_mode():
            emb = self.tower(x).numpy()
        return emb

    def embed_images(
        self, images: Sequence[DecodedImage | ImageSource], *, batch_size: int = 16
    ) -> npt.NDArray[np.float32]:
        parts = [
            self.embed_batch(self.prepare(images[i : i + batch_size]))
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, self.embed_dim), np.float32)

    def embed_texts(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """[N,512] L2-normalised text embeddings."""
        if getattr(self, "_released", False):
            raise ModelError("this CLIP encoder released its torch model (lean worker): no text")
        with torch.inference_mode():
            tokens = self.tokenizer(list(texts))
            out = self.model.encode_text(tokens)  # type: ignore[operator]
            return F.normalize(out, dim=-1).numpy().astype(np.float32)

    @property
    def embed_dim(self) -> int:
        return int(self._negative_vector.shape[0])

    # ------------------------------------------------------------ tags

    def _prompt_vectors(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        prompts = [p for f in NIH_FINDINGS for p in FINDING_PROMPTS[f]] + list(NEGATIVE_PROMPTS)
        key = hashlib.sha256(json.dumps([self.weights_sha256, prompts]).encode()).hexdigest()[:24]
        path = self.cache_dir / f"clip-prompts-{key}.npy" if self.cache_dir else None
        emb: npt.NDArray[np.float32] | None = None
        if path is not None and path.is_file():
            with contextlib.suppress(OSError, ValueError):
                emb = np.load(path)
        if emb is None or emb.shape[0] != len(prompts):
            emb = self.embed_texts(prompts)
            if path is not None:
                with contextlib.suppress(OSError):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(".tmp.npy")
                    np.save(tmp, emb)
                    os.replace(tmp, path)
        per = len(FINDING_PROMPTS[NIH_FINDINGS[0]])
        findings = emb[: per * len(NIH_FINDINGS)].reshape(len(NIH_FINDINGS), per, -1).mean(axis=1)
        negative = emb[per * len(NIH_FINDINGS) :].mean(axis=0)
        norm = np.linalg.norm
        return (
            (findings / norm(findings, axis=1, keepdims=True)).astype(np.float32),
            (negative / norm(negative)).astype(np.float32),
        )

    def _tag_scores(self, embeddings: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        sims = embeddings @ self._finding_vectors.T  # [B,14]
        neg = embeddings @ self._negative_vector  # [B]
        # two-way softmax at CLIP's own temperature: finding prompts vs normal prompts
        scores: npt.NDArray[np.float64] = 1.0 / (
            1.0 + np.exp(-self.logit_scale * (sims - neg[:, None]).astype(np.float64))
        )
        return scores

    def tags(self, embeddings: npt.NDArray[np.float32]) -> list[tuple[ZeroShotTag, ...]]:
        sims = embeddings @ self._finding_vectors.T  # [B,14]
        scores = self._tag_scores(embeddings)
        out = []
        for i in range(embeddings.shape[0]):
            tags = [
                ZeroShotTag(finding=f, score=float(scores[i, k]), similarity=float(sims[i, k]))
                for k, f in enumerate(NIH_FINDINGS)
            ]
            out.append(tuple(sorted(tags, key=lambda t: -t.score)))
        return out

    def analyze(
        self, images: Sequence[DecodedImage | ImageSource], *, batch_size: int = 16
    ) -> list[ClipAnalysis]:
        emb = self.embed_images(images, batch_size=batch_size)
        return [
            ClipAnalysis(
                embedding=emb[i],
                tags=tags,
                model_version=self.model_version,
                untrained=self.untrained,
            )
            for i, tags in enumerate(self.tags(emb))
        ]


def hub_reachable(timeout: float = 1.5) -> bool:
    """Whether the model hub answers at all (one TCP connect)."""
    try:
        with socket.create_connection((_HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def set_hub_offline() -> None:
    """Switch this process's Hugging Face hub client offline.

    huggingface_hub reads ``HF_HUB_OFFLINE`` into a module constant at import and consults
    that constant on every request, so setting the constant is enough; the process
    environment is left alone (only Settings reads it).
    """
    with contextlib.suppress(ImportError):
        import huggingface_hub.constants as hf_constants

        hf_constants.HF_HUB_OFFLINE = True
