"""Evaluation benchmark: ``cxr evaluate``'s metrics on 22,433 images × 14 findings, against the
obvious peer (scikit-learn's ``roc_auc_score`` on each bootstrap resample), same run.

The data is synthetic with NIH's test-set size and per-finding prevalences (binormal scores),
so the figure needs no model. Ours is everything ``cxr evaluate`` computes per finding (AUROC,
its 1,000-resample stratified bootstrap CI, AUPRC, ECE, Brier, the operating point and the
three subgroup AUROCs). The peer loops ``roc_auc_score`` over resamples; it runs
``--peer-resamples`` of them per finding and is scaled to 1,000 (printed as such).

    .venv/bin/python bench/evaluate.py [--n 22433] [--resamples 1000] [--peer-resamples 100]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT))

from bench._common import load  # noqa: E402
from models.evaluation import evaluate_finding  # noqa: E402
from models.types import NIH_FINDINGS  # noqa: E402

#: NIH ChestX-ray14 label prevalences (whole set), in NIH_FINDINGS order
PREVALENCE = (0.103, 0.025, 0.119, 0.177, 0.052, 0.056, 0.013, 0.047, 0.042, 0.021, 0.022,
              0.015, 0.030, 0.002)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=22433)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--peer-resamples", type=int, default=100)
    args = parser.parse_args()
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.random((args.n, len(NIH_FINDINGS))) < np.array(PREVALENCE)
    logits = rng.normal(0.0, 1.0, y.shape) + 1.2 * y
    probs = 1.0 / (1.0 + np.exp(-(logits - 2.0)))
    groups = {
        "sex": list(rng.choice(["M", "F"], args.n)),
        "age": list(rng.choice(["18-39", "40-59", "60-79"], args.n)),
        "view": list(rng.choice(["PA", "AP"], args.n)),
    }
    print(f"{args.n} images x {len(NIH_FINDINGS)} findings, load {load()}")
    t0 = time.perf_counter()
    for k, finding in enumerate(NIH_FINDINGS):
        evaluate_finding(
            finding, y[:, k], probs[:, k], threshold=0.1, groups=groups,
            resamples=args.resamples, seed=k,
        )  # fmt: skip
    ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    for k in range(len(NIH_FINDINGS)):
        yk, pk = y[:, k], probs[:, k]
        pos, neg = np.flatnonzero(yk), np.flatnonzero(~yk)
        for _ in range(args.peer_resamples):
            idx = np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]
            roc_auc_score(yk[idx], pk[idx])
    peer = (time.perf_counter() - t0) * args.resamples / args.peer_resamples
    print(f"ours, all metrics, {args.resamples} resamples: {ours:8.2f} s")
    print(
        f"peer, roc_auc_score per resample (bootstrap only; {args.peer_resamples} run, "
        f"scaled to {args.resamples}): {peer:8.2f} s"
    )
    print(f"ours / peer: {peer / ours:.1f}x faster; load after {load()}")


if __name__ == "__main__":
    main()
