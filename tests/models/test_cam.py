"""Class activation maps: exact identity with the logits, and localisation end to end."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.classifier import Classifier
from models.onepass import OnePassNet


def test_cam_mean_plus_bias_is_the_reference_logit(
    torch_classifier: Classifier, nih_images: list[Path]
) -> None:
    x = torch_classifier.prepare(nih_images)
    model = torch_classifier.model
    with torch.inference_mode():
        # torchxrayvision's own head: Linear(avgpool(relu(features(x))))
        reference = model.classifier(model.features2(x)).numpy()
    results = torch_classifier.analyze_batch(x)
    index = list(torch_classifier.spec.finding_index())
    for i, analysis in enumerate(results):
        assert analysis.cams.shape == (14, 7, 7)
        assert analysis.features.shape == (1024,)
        from_cam = analysis.cams.mean(axis=(1, 2)) + analysis.cam_bias
        logits = np.array([f.logit for f in analysis.findings])
        np.testing.assert_allclose(from_cam, reference[i, index], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(logits, reference[i, index], rtol=1e-4, atol=1e-4)
    # the untrained model still has a real bias, so the identity is not trivial
    assert np.abs(results[0].cam_bias).max() > 0.05


class _TinyFeatures(nn.Sequential):
    """224 → 7×7×32, ending in BatchNorm like DenseNet's norm5 (the head applies the ReLU).

    2×2 stride-2 convolutions give each 7×7 cell exactly its own 32 px patch as
    receptive field, so a correct CAM must peak on the patch the blob covers most.
    """

    def __init__(self) -> None:
        layers: list[nn.Module] = []
        channels = [1, 8, 16, 16, 32, 32]
        for cin, cout in itertools.pairwise(channels):
            layers += [
                nn.Conv2d(cin, cout, 2, stride=2),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            ]
        layers[-1] = nn.Identity()
        super().__init__(*layers)


class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = _TinyFeatures()
        self.classifier = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.relu(self.features(x)).mean(dim=(2, 3)))


def _blobs(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Textured backgrounds; half get a bright Gaussian blob (box ±2σ) in a random quadrant."""
    size, sigma = 224, 18
    radius = 2 * sigma
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    x = torch.rand(n, 1, size, size, generator=gen) * 0.6
    x = F.avg_pool2d(x, 5, stride=1, padding=2)  # smooth noise, not a flat field
    labels = torch.zeros(n)
    boxes = torch.zeros(n, 4, dtype=torch.long)
    for i in range(n // 2):
        qy, qx = torch.randint(0, 2, (2,), generator=gen).tolist()
        cy = qy * 112 + int(torch.randint(radius, 112 - radius, (1,), generator=gen))
        cx = qx * 112 + int(torch.randint(radius, 112 - radius, (1,), generator=gen))
        blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2.0 * sigma**2))
        x[i, 0] = (x[i, 0] + 0.8 * blob).clamp(max=1.0)
        labels[i] = 1.0
        boxes[i] = torch.tensor([cy - radius, cy + radius, cx - radius, cx + radius])
    return x * 2048 - 1024, labels, boxes


def test_cam_peak_falls_inside_the_blob() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = _TinyNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    train_x, train_y, _ = _blobs(256, gen)
    train_x = train_x / 1024  # the tiny net trains faster on unit-scale input
    start = time.perf_counter()
    net.train()
    for _ in range(20):
        order = torch.randperm(len(train_x), generator=gen)
        for b in range(0, len(train_x), 32):
            batch = order[b : b + 32]
            loss = F.binary_cross_entropy_with_logits(net(train_x[batch])[:, 0], train_y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        # a few seconds on an idle machine; the cap keeps a loaded one from stalling
        if float(loss.detach()) < 0.02 or time.perf_counter() - start > 40:
            break
    # a few dozen steps leave BatchNorm's running averages far from the data: re-estimate them
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        net(train_x)
    net.eval()
    test_x, test_y, boxes = _blobs(96, gen)
    test_x = test_x / 1024
    with torch.inference_mode():
        logits, cams, _ = OnePassNet(net)(test_x)
    accuracy = float(((logits[:, 0] > 0).float() == test_y).float().mean())
    assert accuracy >= 0.9, f"the head did not learn the task (accuracy {accuracy:.2f})"
    hits = positives = 0
    for i in range(len(test_x)):
        if test_y[i] != 1:
            continue
        positives += 1
        # The peak cell's centre: an upsampled map is flat out to the border beyond
        # the outer cell centres, so its argmax would land on the image edge.
        cam = cams[i, 0].numpy()
        row, col = np.unravel_index(int(cam.argmax()), cam.shape)
        cell = 224 / cam.shape[0]
        py, px = (row + 0.5) * cell, (col + 0.5) * cell
        y0, y1, x0, x1 = boxes[i].tolist()
        hits += int(y0 <= py <= y1 and x0 <= px <= x1)
    assert hits / positives >= 0.9, f"CAM peak inside the blob on {hits}/{positives}"
    print(f"CAM peak inside the blob on {hits}/{positives} held-out positives")
