"""Within-class diversity of digit samples kept by `uvit fid RUN` (RUN/eval/*.npz: uint8 arr_0, asked class arr_1).

For each class: the mean pairwise distance of the digits classifier's features between samples asked for that class,
over the same for the real digits of that class (1.0 = as spread as the data); printed as the mean over classes.
Usage: python benchmarks/digits_diversity.py runs/digits/eval/*.npz
"""
import sys

import numpy as np
import torch

from uvit_cli.data.digits import load_digits_uint8
from uvit_cli.metrics.digits import digits_outputs, load_classifier


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
        feats, _ = digits_outputs(model, x)
        rel = [spread(feats[y == c]) / ref[c] for c in range(10) if (y == c).sum() > 1]
        print(f"{path}: within-class spread / real = {np.mean(rel):.3f} "
              f"(per class {' '.join(f'{r:.2f}' for r in rel)})")


if __name__ == "__main__":
    main(sys.argv[1:])
