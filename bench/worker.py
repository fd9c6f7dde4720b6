"""The worker's footprint: time to ready and steady RSS with both models, lean graph path
against the torch backend (the peer), each in a fresh process, same run.

"Ready" is from the process's start (interpreter included) until ``build_analyzer`` returns
(both models loaded, graphs from a warm cache, start-up checks done); "steady" is the RSS
after analysing a few NIH images one at a time, as jobs arrive. Never asserts.

    .venv/bin/python bench/worker.py [--images 6]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT))

from bench._common import load  # noqa: E402

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
import psutil
from fhir_service.runtime import build_analyzer
from fhir_service.settings import Settings
cfg = json.loads(sys.argv[1])
settings = Settings(model_weights="untrained", clip_weights="untrained",
                    model_cache_dir=Path(cfg["cache"]), **cfg["settings"])
analyzer = build_analyzer(settings, lean=cfg["lean"])
ready = time.perf_counter() - t0
rss_ready = psutil.Process().memory_info().rss
images = sorted((settings.shared_dir / "data" / "nih-sample").glob("*.png"))[: cfg["images"]]
per = []
for p in images:
    t = time.perf_counter()
    analyzer.analyze(p.read_bytes(), p.name)
    per.append(time.perf_counter() - t)
import resource
print(json.dumps({"ready_s": ready, "rss_ready": rss_ready,
                  "rss_steady": psutil.Process().memory_info().rss,
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "study_s": sorted(per)[len(per) // 2]}))
"""


def _run(label: str, cfg: dict[str, object]) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(cfg)],
        cwd=_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{label} failed:\n{out.stderr[-3000:]}")
    r: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"  {label:<40} ready {r['ready_s']:5.1f} s; RSS at ready {r['rss_ready'] / 2**30:.2f} "
        f"GiB, steady {r['rss_steady'] / 2**30:.2f} GiB (peak {r['peak'] / 2**30:.2f}); "
        f"median study {r['study_s'] * 1e3:.0f} ms; load {load()}"
    )
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--cache", type=Path, default=_ROOT / ".cxr-data" / "bench-cache")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "int8"))
    args = parser.parse_args()
    base = {"cache": str(args.cache), "images": args.images}
    print(f"worker footprint, untrained DenseNet + CLIP ViT-B-32; load {load()}")
    configs = [
        ("warm-up (fills the graph cache)", False, {}),
        (
            "peer: torch backend (both models)",
            False,
            {"model_backend": "torch", "clip_backend": "torch"},
        ),
        ("onnx fp32, not lean", False, {}),
        ("lean: onnx fp32", True, {}),
        (
            f"lean: openvino {args.precision}",
            True,
            {
                "model_backend": "openvino",
                "clip_backend": "openvino",
                "model_precision": args.precision,
                "clip_precision": args.precision,
            },
        ),
    ]
    results = {}
    for label, lean, settings in configs:
        if label.startswith("warm-up"):
            _run(label, base | {"lean": lean, "settings": settings})
            _run(label, base | {"lean": True, "settings": configs[-1][2]})
            continue
        results[label] = _run(label, base | {"lean": lean, "settings": settings})
    peer = results["peer: torch backend (both models)"]
    for label, r in results.items():
        if label.startswith("lean"):
            print(
                f"  {label}: steady RSS {r['rss_steady'] / peer['rss_steady']:.2f}x and time "
                f"to ready {r['ready_s'] / peer['ready_s']:.2f}x the torch peer's (below 1: less)"
            )


if __name__ == "__main__":
    main()
