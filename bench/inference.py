"""Inference benchmark: our one pass against the plain torchxrayvision forward, same run.

Prints (never asserts) images/s at batch 1 and 16 for the full pass (14 scores +
14 CAMs + pooled features) on the torch and ONNX Runtime backends, with TTA and
with CLIP; the plain torchxrayvision ``model(x)`` as the reference; the CAM cost
as a fraction of the forward pass; Grad-CAM for the same 14 classes as the peer;
preprocessing of a 1024² PNG; load times; peak RSS with both models loaded.

Then the reduced-precision table (bench/_precision.py): fp32, bf16 and int8 on ONNX Runtime
and OpenVINO, each behind the precision gate, next to the plain ONNX Runtime logits graph.

Torch is timed before any ONNX Runtime session exists: ORT's spinning thread
pool slows eager torch in the same process.

    .venv/bin/python bench/inference.py [--weights untrained] [--reps 5] [--no-clip]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT))


def _median_time(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """The best of ``reps`` runs: on a shared 2-core machine, other load only adds time."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    _MEDIANS.append(statistics.median(times))
    return min(times)


_MEDIANS: list[float] = []


def _rss_mib() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="untrained")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-clip", action="store_true")
    parser.add_argument("--no-precision", action="store_true", help="skip the fp32/bf16/int8 table")
    parser.add_argument("--cache", type=Path, default=_ROOT / ".cxr-data" / "bench-cache")
    args = parser.parse_args()

    t0 = time.perf_counter()
    import torch
    import torch.nn.functional as F

    from fhir_service.settings import Settings
    from models.classifier import Classifier
    from models.onepass import OnnxBackend, export_onnx, ort_session
    from models.registry import resolve_weights

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    import_s = time.perf_counter() - t0
    nih = Settings().shared_dir / "data" / "nih-sample"
    paths = sorted(p for p in nih.glob("*.png"))[:16]
    png_1024 = next(p for p in paths if p.stat().st_size > 300_000)

    print(
        f"torch {torch.__version__}, {threads} threads; weights {args.weights}; reps {args.reps};"
        " times are the best of the reps (medians in parentheses)"
    )
    print(f"imports (torch, torchxrayvision): {import_s:.2f} s")

    t = time.perf_counter()
    loaded = resolve_weights(args.weights)
    classifier = Classifier(loaded, backend="torch", tta=False)
    print(f"load DenseNet weights + torch backend: {time.perf_counter() - t:.2f} s")

    data = png_1024.read_bytes()
    prep_s = _median_time(lambda: classifier.preprocess(data), reps=20)
    print(f"preprocess 1024² PNG (decode + crop + resize + scale): {prep_s * 1e3:.2f} ms")

    x16 = classifier.prepare(paths)
    x1 = x16[:1]
    model = loaded.model

    def ref_forward(x: torch.Tensor) -> None:
        with torch.inference_mode():
            model(x)  # torchxrayvision's own forward

    def measure(label: str, fn: Callable[[torch.Tensor], object]) -> tuple[float, float]:
        bs1 = _median_time(lambda: fn(x1), reps=max(args.reps * 2, 5))
        bs16 = _median_time(lambda: fn(x16), reps=args.reps)
        med1, med16 = _MEDIANS[-2], _MEDIANS[-1]
        print(
            f"  {label:<48} bs1 {bs1 * 1e3:7.1f} ms   bs16 {16 / bs16:6.1f} img/s"
            f"   (medians {med1 * 1e3:.1f} ms, {16 / med16:.1f} img/s)"
        )
        return bs1, bs16

    print("throughput (real NIH images, preprocessed once):")
    _, ref16 = measure("torch: plain torchxrayvision model(x) [reference]", ref_forward)
    _, torch16 = measure("torch: our full pass (14 scores+CAMs+features)", classifier.analyze_batch)

    # CAM cost in isolation: the 1×1 convolution over relu(F), against the forward pass
    with torch.inference_mode():
        fmap = F.relu(model.features(x16))
    weight = model.classifier.weight[:, :, None, None].detach()

    def cams_only() -> None:
        with torch.inference_mode():
            F.conv2d(fmap, weight)

    cam_s = _median_time(cams_only, reps=20)
    print(
        f"  CAMs alone (bs16, all outputs): {cam_s * 1e3:.3f} ms = "
        f"{cam_s / ref16 * 100:.2f}% of the torch forward pass"
    )

    # Grad-CAM for the same 14 classes: a forward with autograd, 14 backward passes
    index = list(loaded.spec.finding_index())

    def grad_cam(x: torch.Tensor) -> None:
        f = model.features(x)
        f.retain_grad()
        logits = model.classifier(F.adaptive_avg_pool2d(F.relu(f), 1).flatten(1))
        for k in index:
            (grad,) = torch.autograd.grad(logits[:, k].sum(), f, retain_graph=True)
            F.relu((grad.mean(dim=(2, 3), keepdim=True) * f).sum(1))

    grad16 = _median_time(lambda: grad_cam(x16), reps=max(2, args.reps // 2))
    print(
        f"  Grad-CAM, 14 classes, bs16 (its own autograd pass + 14 backward): "
        f"{grad16 * 1e3:.0f} ms per batch = {grad16 / ref16:.2f}x the inference forward; "
        f"our 14 CAMs {cam_s * 1e3:.2f} ms, "
        f"i.e. Grad-CAM costs {grad16 / max(cam_s, 1e-9):.0f}x more"
    )

    # ---- ONNX Runtime (after all torch timings)
    t = time.perf_counter()
    args.cache.mkdir(parents=True, exist_ok=True)
    onnx_backend = OnnxBackend(
        classifier.net,
        input_size=224,
        weights_sha256=loaded.sha256,
        cache_dir=args.cache,
        num_threads=threads,
    )
    print(f"ONNX backend ready (export or cache + start-up check): {time.perf_counter() - t:.2f} s")
    fast = Classifier(loaded, backend="torch", tta=False)
    fast.backend = onnx_backend
    fast_tta = Classifier(loaded, backend="torch", tta=True)
    fast_tta.backend = onnx_backend

    class _Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m.classifier(self.m.features2(x))

    plain = ort_session(export_onnx(_Plain(), x1, ["logits"]), threads)

    print("throughput, ONNX Runtime:")
    measure("onnx: plain logits graph", lambda x: plain.run(None, {"x": x.numpy()}))
    _, ort16 = measure("onnx: our full pass (14 scores+CAMs+features)", fast.analyze_batch)
    measure("onnx: full pass + TTA band (3 views)", fast_tta.analyze_batch)
    print(
        f"  full pass ONNX vs plain torchxrayvision torch forward: {ref16 / ort16:.2f}× "
        f"(bs16); vs our torch backend: {torch16 / ort16:.2f}×"
    )

    if not args.no_precision:
        from bench._precision import precision_table

        precision_table(
            fast,
            x16.numpy(),
            lambda x: plain.run(None, {"x": x}),
            gate_images=sorted(nih.glob("*.png")),
            cache=args.cache,
            threads=threads,
            reps=args.reps,
        )

    if not args.no_clip:
        from models.factory import load_clip

        t = time.perf_counter()
        clip = load_clip(
            weights="untrained" if args.weights == "untrained" else None,
            backend="onnx",
            cache_dir=args.cache,
            num_threads=threads,
        )
        print(
            f"load CLIP {clip.model_version} (+ONNX tower, prompts): "
            f"{time.perf_counter() - t:.2f} s"
        )
        decoded = [fast.preprocess.decode(p) for p in paths]
        c16 = clip.prepare(decoded)

        def with_clip(x: torch.Tensor) -> None:
            fast.analyze_batch(x)
            emb = clip.embed_batch(c16[: x.shape[0]])
            clip.tags(emb)

        measure("onnx: full pass + CLIP embedding + tags", with_clip)
        if not args.no_precision:
            from bench._precision import clip_precision_table

            clip_precision_table(
                clip, sorted(nih.glob("*.png")), cache=args.cache, threads=threads, reps=args.reps
            )
        measure(
            "onnx: CLIP image tower + tags alone",
            lambda x: clip.tags(clip.embed_batch(c16[: x.shape[0]])),
        )

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"RSS now {_rss_mib():.0f} MiB; peak RSS {peak:.0f} MiB "
        f"({'DenseNet + CLIP' if not args.no_clip else 'DenseNet only'})"
    )


if __name__ == "__main__":
    main()
