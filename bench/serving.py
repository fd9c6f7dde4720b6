"""The serving pass per study, by stage: today's path against the cheaper one, same run.

One study = one NIH image, as the worker sees it: decode, the DenseNet pass (scores, CAMs,
TTA band: the two augmented views ride in the same batch as the main view), the CLIP image
tower, and the heatmap overlays of the findings that are published (the positive ones).

* baseline (main at 63e8cb6): ONNX Runtime fp32 for both models, and one ``overlay_png`` per
  published finding (its own crop and resize of the radiograph, median-cut palette, PNG
  ``optimize`` with up to four encodings until it fits);
* ours: the worker's own :class:`subscriptions.analyzer.ModelAnalyzer` on the runtime and
  precision given (default ONNX Runtime fp32; bf16/int8 behind the precision gate), drawing
  the published overlays with ``overlay_pngs`` (one resize, a fixed palette, one encode each).

Prints per-stage milliseconds per study (best and median of the studies), the overlay
count and size, and the ratio, with the load average; never asserts.

    .venv/bin/python bench/serving.py [--studies 12] [--runtime openvino] [--precision bf16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT))

from bench._common import load  # noqa: E402

STAGES = ("decode", "densenet", "clip", "overlays")


def _baseline(classifier: object, clip: object, data: bytes) -> tuple[dict[str, float], int, int]:
    from models.heatmap import overlay_png
    from models.preprocess import decode_image

    clock = time.perf_counter
    t0 = clock()
    decoded = decode_image(data)
    t1 = clock()
    (analysis,) = classifier.analyze([decoded])  # type: ignore[attr-defined]
    t2 = clock()
    clip.embed_images([decoded])  # type: ignore[attr-defined]
    t3 = clock()
    pngs = [
        overlay_png(decoded, analysis.cams[k])
        for k, f in enumerate(analysis.findings)
        if f.positive
    ]
    t4 = clock()
    times = {"decode": t1 - t0, "densenet": t2 - t1, "clip": t3 - t2, "overlays": t4 - t3}
    return times, len(pngs), sum(len(p) for p in pngs)


def _print(label: str, rows: list[dict[str, float]], overlays: int, kb: float) -> float:
    totals = [sum(r.values()) for r in rows]
    parts = ", ".join(f"{s} {statistics.median(r[s] for r in rows) * 1e3:.0f}" for s in STAGES)
    print(
        f"  {label:<34} per study: median {statistics.median(totals) * 1e3:6.0f} ms "
        f"(best {min(totals) * 1e3:.0f}) = {parts} ms; "
        f"{overlays / len(rows):.1f} overlays/study, {kb:.0f} kB each; load {load()}"
    )
    return statistics.median(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument("--runtime", default="onnx", choices=("onnx", "openvino"))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "int8"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache", type=Path, default=_ROOT / ".cxr-data" / "bench-cache")
    args = parser.parse_args()

    from fhir_service.settings import Settings
    from models.factory import load_classifier, load_clip
    from subscriptions.analyzer import ModelAnalyzer

    nih = Settings().shared_dir / "data" / "nih-sample"
    gate = sorted(nih.glob("*.png"))
    studies = [p.read_bytes() for p in gate[: args.studies]]
    common = {"onnx_cache_dir": args.cache, "tta": True, "num_threads": args.threads}
    clip_common = {"weights": "untrained", "cache_dir": args.cache, "num_threads": args.threads}
    print(f"serving pass per study, {len(studies)} NIH images one at a time; load {load()}")

    base_cls = load_classifier("untrained", backend="onnx", **common)  # type: ignore[arg-type]
    base_clip = load_clip(backend="onnx", **clip_common)  # type: ignore[arg-type]
    t = time.perf_counter()
    ours_cls = load_classifier(
        "untrained",
        backend=args.runtime,
        precision=args.precision,
        gate_images=gate,
        **common,  # type: ignore[arg-type]
    )
    ours_clip = load_clip(
        backend=args.runtime,
        precision=args.precision,
        gate_images=gate,
        **clip_common,  # type: ignore[arg-type]
    )
    print(f"  ours ready in {time.perf_counter() - t:.1f} s (gates stored or run)")
    for model in (ours_cls, ours_clip):
        if model.gate_report is not None:
            print(f"    {model.gate_report.summary()}")
    analyzer = ModelAnalyzer(ours_cls, ours_clip)

    base_rows, ours_rows = [], []
    base_n = base_bytes = ours_n = ours_bytes = 0
    _baseline(base_cls, base_clip, studies[0])  # warm-up
    analyzer.analyze(studies[0], "warm-up")
    for i, data in enumerate(studies):  # interleaved: load changes hit both alike
        times, n, size = _baseline(base_cls, base_clip, data)
        base_rows.append(times)
        base_n, base_bytes = base_n + n, base_bytes + size
        result = analyzer.analyze(data, f"study-{i}")
        ours_rows.append(dict(analyzer.last_timings))
        ours_n += len(result.heatmaps)
        ours_bytes += sum(len(p) for p in result.heatmaps.values())
    base = _print(
        "baseline (onnx fp32, overlay_png)", base_rows, base_n, base_bytes / max(base_n, 1) / 1e3
    )
    ours = _print(
        f"ours ({args.runtime} {args.precision}, overlay_pngs)",
        ours_rows,
        ours_n,
        ours_bytes / max(ours_n, 1) / 1e3,
    )
    print(f"  full serving pass: ours {base / ours:.2f}x the baseline per study; load {load()}")


if __name__ == "__main__":
    main()
