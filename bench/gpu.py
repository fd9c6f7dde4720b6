"""The GPU path (CUDA): full-pass and decode throughput on one GPU; not part of CI.

For a lent CUDA machine. Prints (never asserts):

* the full pass (14 scores + CAMs + pooled features, :class:`models.onepass.OnePassNet`) in
  fp32, fp16 and bf16 at batch 64, 128 and 256, channels-last, on preprocessed NIH images
  already on the GPU — images/s;
* the precision gate (:func:`models.precision_gate.compare`) of fp16 and bf16 against fp32
  on the NIH samples, on the GPU;
* decode + preprocess in parallel DataLoader workers into pinned memory — images/s;
* end to end: workers decode, pinned batches copy without blocking, the GPU runs the pass.

The goal in issue 17: ≥ 5,000 img/s for the full pass on one H100/H200-class GPU, so the
112,120-image NIH archive is scored in under a minute of model time. Without CUDA it stops
at once with exit status 2 and says so: the CPU path stays the tested default.

    .venv/bin/python bench/gpu.py [--weights untrained] [--batches 64,128,256] [--workers N]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT))

from bench._common import load  # noqa: E402


def _require_cuda(smoke: bool) -> Any:
    import torch

    if smoke:
        print("CPU SMOKE RUN (--smoke-cpu): checks that this script runs; NOT GPU figures")
        return torch
    if not torch.cuda.is_available():
        reason = (
            "this torch build has no CUDA"
            if torch.version.cuda is None
            else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
        )
        print(f"bench/gpu.py needs a CUDA GPU: {reason}. Nothing was measured.", file=sys.stderr)
        raise SystemExit(2)
    return torch


def _sync(torch: Any) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(torch: Any, fn: Any, reps: int) -> float:
    fn()
    _sync(torch)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(torch)
    return (time.perf_counter() - start) / reps


class _Decode:
    """Map-style dataset: path → preprocessed [1,S,S] tensor (runs in the workers)."""

    def __init__(self, paths: list[Path], preprocess: Any) -> None:
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Any:
        return self.preprocess(self.paths[i])


def _pass_table(torch: Any, net: Any, x: Any, batches: list[int], reps: int) -> dict[str, Any]:
    outputs: dict[str, Any] = {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        # each precision from the fp32 weights (bf16 rounded from fp16 would lose range)
        model = copy.deepcopy(net).to(dtype=dtype, memory_format=torch.channels_last)
        for batch in batches:
            xb = x[:batch].to(dtype=dtype, memory_format=torch.channels_last)

            def run(m: Any = model, b: Any = xb) -> None:
                with torch.inference_mode():
                    m(b)

            s = _timed(torch, run, reps)
            print(f"  full pass {name:<5} batch {batch:4d}: {batch / s:9.0f} img/s")
        with torch.inference_mode():
            sample = x[:64].to(dtype=dtype, memory_format=torch.channels_last)
            outputs[name] = [t.float().cpu().numpy() for t in model(sample)]
        del model
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="untrained")
    parser.add_argument("--batches", default="64,128,256")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--decode-images", type=int, default=2048)
    parser.add_argument(
        "--smoke-cpu", action="store_true", help="tiny run on the CPU to check the script"
    )
    args = parser.parse_args()
    torch = _require_cuda(args.smoke_cpu)
    torch.backends.cudnn.benchmark = True

    from fhir_service.settings import Settings
    from models.classifier import Classifier
    from models.onepass import OnePassNet
    from models.registry import resolve_weights

    device = torch.device("cpu" if args.smoke_cpu else "cuda")
    name = "CPU (smoke)" if args.smoke_cpu else torch.cuda.get_device_name(0)
    print(f"device {name}, torch {torch.__version__}; load {load()}")
    loaded = resolve_weights(args.weights)
    classifier = Classifier(loaded, backend="torch", tta=False)
    net = OnePassNet(loaded.model).eval().to(device)
    nih = sorted((Settings().shared_dir / "data" / "nih-sample").glob("*.png"))
    batches = [int(b) for b in args.batches.split(",")]
    base = classifier.prepare(nih)
    reps = -(-max(batches) // len(base))
    x = base.repeat(reps, 1, 1, 1)[: max(batches)].to(device)

    print("full pass (scores + CAMs + features), images on the GPU:")
    outputs = _pass_table(torch, net, x, batches, args.reps)
    _gate(classifier, outputs, min(64, len(base)))

    print(f"decode + preprocess, {args.workers} workers, pinned memory:")
    paths = (nih * (-(-args.decode_images // len(nih))))[: args.decode_images]
    loader = torch.utils.data.DataLoader(
        _Decode(paths, classifier.preprocess),
        batch_size=256,
        num_workers=args.workers,
        pin_memory=not args.smoke_cpu,
        persistent_workers=True,
        prefetch_factor=4,
    )
    start = time.perf_counter()
    n = sum(len(b) for b in loader)
    decode_s = time.perf_counter() - start
    print(f"  decode only: {n / decode_s:9.0f} img/s ({n} images)")
    half = copy.deepcopy(net).to(dtype=torch.float16, memory_format=torch.channels_last)
    start = time.perf_counter()
    with torch.inference_mode():
        for b in loader:
            half(b.to(device, non_blocking=True).to(torch.float16))
    _sync(torch)
    e2e = time.perf_counter() - start
    print(f"  end to end (decode → fp16 full pass): {n / e2e:9.0f} img/s; load {load()}")


def _gate(classifier: Any, outputs: dict[str, Any], n: int) -> None:
    import numpy as np

    from models.calibration import sigmoid
    from models.precision_gate import compare
    from models.types import NIH_FINDINGS

    index = np.array(classifier.spec.finding_index())
    ref = outputs["fp32"]
    for name in ("fp16", "bf16"):
        cand = outputs[name]
        report = compare(
            runtime="cuda",
            precision=name,
            weights_sha256=classifier.weights_sha256,
            reference_probability=sigmoid(ref[0][:n, index]),
            candidate_probability=sigmoid(cand[0][:n, index]),
            thresholds=classifier.thresholds,
            reference_cams=ref[1][:n, index],
            candidate_cams=cand[1][:n, index],
            reference_features=ref[2][:n],
            candidate_features=cand[2][:n],
            findings=NIH_FINDINGS,
        )
        print(f"  {report.summary()}")


if __name__ == "__main__":
    main()
