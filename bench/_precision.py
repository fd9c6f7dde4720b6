"""bench/inference.py's reduced-precision table: fp32, bf16 and int8 on ONNX Runtime and
OpenVINO for the DenseNet full pass (14 scores + CAMs + features), each judged by the
precision gate on the NIH samples, next to the plain ONNX Runtime logits graph (the peer)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import load


def _best(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def _failed_graph(cache: Path, sha: str, runtime: str, precision: str) -> Any:
    """A session opener for a graph that exists but failed its gate (for timing only)."""
    from models.onepass import onnx_cache_path, ort_session
    from models.reduced import graph_stem, openvino_session

    stem = graph_stem(onnx_cache_path(cache, "densenet-onepass", sha), runtime, precision)  # type: ignore[arg-type]
    if precision != "int8":
        return None
    if runtime == "openvino" and stem.with_suffix(".xml").is_file():
        return lambda t: openvino_session(stem.with_suffix(".xml"), "int8", t)
    if runtime == "onnx" and stem.with_suffix(".onnx").is_file():
        return lambda t: ort_session(stem.with_suffix(".onnx"), t)
    return None


def precision_table(
    classifier: Any,
    x16: np.ndarray,
    peer: Callable[[np.ndarray], object],
    *,
    gate_images: list[Path],
    cache: Path,
    threads: int,
    reps: int,
) -> dict[tuple[str, str], float]:
    """Print one row per (runtime, precision); return img/s at batch 16 by row."""
    from models.serving import GateData, build_pass_backend

    gate = GateData(lambda: classifier.prepare(gate_images).numpy(), classifier._judge)
    peer_s, peer_med = _best(lambda: peer(x16), reps)
    print(
        f"reduced precision, DenseNet full pass, bs16, {threads} threads, "
        f"gate on {len(gate_images)} NIH images; load {load()}"
    )
    print(
        f"  {'peer: ONNX Runtime plain logits graph, fp32':<44} {16 / peer_s:6.1f} img/s "
        f"(median {16 / peer_med:.1f})"
    )
    rates: dict[tuple[str, str], float] = {}
    for runtime in ("onnx", "openvino"):
        for precision in ("fp32", "bf16", "int8"):
            label = f"{runtime} {precision} full pass"
            t = time.perf_counter()
            try:
                backend = build_pass_backend(
                    classifier.net,
                    runtime=runtime,  # type: ignore[arg-type]
                    precision=precision,  # type: ignore[arg-type]
                    input_size=x16.shape[-1],
                    weights_sha256=classifier.weights_sha256,
                    cache_dir=cache,
                    num_threads=threads,
                    gate=gate,
                )
            except Exception as exc:  # a refused combination or a failed gate is a result
                print(f"  {label:<44} not served: {str(exc)[:300]}")
                failed = _failed_graph(cache, classifier.weights_sha256, runtime, precision)
                if failed is not None:
                    session = failed(threads)
                    best, _ = _best(lambda s=session: s.run(None, {"x": x16}), reps)
                    print(
                        f"    its speed, measured only (gate FAILED, never served): "
                        f"{16 / best:6.1f} img/s = {16 / best / (16 / peer_s):.2f}x the peer"
                    )
                continue
            ready = time.perf_counter() - t
            best, med = _best(lambda b=backend: b.run(x16), reps)
            bs1, _ = _best(lambda b=backend: b.run(x16[:1]), reps * 2)
            rates[(runtime, precision)] = 16 / best
            base = rates.get(("onnx", "fp32"), 16 / best)
            report = getattr(backend, "gate", None)
            print(
                f"  {label:<44} {16 / best:6.1f} img/s (median {16 / med:.1f}), "
                f"bs1 {bs1 * 1e3:6.1f} ms; {16 / best / (16 / peer_s):.2f}x the peer, "
                f"{16 / best / base:.2f}x onnx fp32; ready {ready:.1f} s; load {load()}"
            )
            if report is not None:
                print(f"    {report.summary()}")
    return rates


def clip_precision_table(
    clip: Any, gate_images: list[Path], *, cache: Path, threads: int, reps: int
) -> None:
    """The same table for the CLIP image tower (embedding + tag scores), bs16."""
    import torch

    from models.clip_serving import clip_session
    from models.onepass import load_or_export, ort_session

    size = clip.preprocess.size
    source = load_or_export(
        clip.tower,
        torch.zeros(1, 3, size, size),
        ["embedding"],
        cache_dir=cache,
        prefix="clip-image",
        weights_sha256=clip.weights_sha256,
    )
    fp32 = ort_session(source, threads)
    x = clip.prepare(gate_images[:16]).numpy()
    print(f"reduced precision, CLIP image tower, bs16, {threads} threads; load {load()}")
    base = None
    for runtime in ("onnx", "openvino"):
        for precision in ("fp32", "bf16", "int8"):
            label = f"CLIP {runtime} {precision}"
            try:
                session, report = clip_session(
                    fp32,
                    source,
                    runtime=runtime,  # type: ignore[arg-type]
                    precision=precision,  # type: ignore[arg-type]
                    weights_sha256=clip.weights_sha256,
                    num_threads=threads,
                    gate_images=lambda: clip.prepare(gate_images).numpy(),
                    tag_scores=clip._tag_scores,
                )
            except Exception as exc:
                print(f"  {label:<44} not served: {exc}")
                continue
            best, med = _best(lambda s=session: s.run(None, {"x": x}), reps)
            base = base or 16 / best
            print(
                f"  {label:<44} {16 / best:6.1f} img/s (median {16 / med:.1f}); "
                f"{16 / best / base:.2f}x CLIP onnx fp32; load {load()}"
            )
            if report is not None:
                print(f"    {report.summary()}")
