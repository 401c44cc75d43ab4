"""Within-class diversity of digit samples kept by `uvit fid RUN` (RUN/eval/*.npz: uint8 arr_0, asked class arr_1).

In the digits classifier's 64-d feature space, per asked class, against the real digits of that class:
- spread: the mean pairwise distance between samples over the same for the real digits (1.0 = as spread as the data);
- precision / recall (Kynkaanniemi et al. 2019, k = 3): the share of samples inside the real digits' manifold
  (fidelity), and of real digits inside the samples' manifold (coverage, the diversity that matters).
Each is printed as the mean over classes, with the share of samples classified as the asked digit.
Usage: python benchmarks/digits_diversity.py runs/digits/eval/*.npz
"""
import sys

import numpy as np
import torch

from uvit_cli.data.digits import load_digits_uint8
from uvit_cli.metrics.digits import digits_outputs, load_classifier
from uvit_cli.metrics.precision_recall import precision_recall


def spread(features: np.ndarray) -> float:
    """Mean distance between distinct pairs."""
    f = torch.from_numpy(features)
    n = len(f)
    return float(torch.cdist(f, f).sum() / (n * (n - 1)))


def main(paths: list[str]) -> None:
    model = load_classifier()
    images, labels = load_digits_uint8()
    real, _ = digits_outputs(model, images)
    ref = {c: spread(real[labels == c]) for c in range(10)}
    for path in paths:
        with np.load(path) as z:
            x, y = z["arr_0"], z["arr_1"]
        feats, pred = digits_outputs(model, x)
        classes = [c for c in range(10) if (y == c).sum() > 3]  # k = 3 neighbours need 4 samples
        rel = [spread(feats[y == c]) / ref[c] for c in classes]
        pr = np.array([precision_recall(real[labels == c], feats[y == c]) for c in classes])
        print(f"{path}: asked digit {np.mean(pred == y):.3f}, within-class spread / real = {np.mean(rel):.3f}, "
              f"precision {pr[:, 0].mean():.3f}, recall {pr[:, 1].mean():.3f} "
              f"(spread per class {' '.join(f'{r:.2f}' for r in rel)})")


if __name__ == "__main__":
    main(sys.argv[1:])
