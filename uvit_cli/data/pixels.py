"""Pixel training sources: the built-in digits, and any image source (data/sources.py) through its official crop.

A training source has ``len(source)``, ``num_classes`` and ``get(i, flip) -> (image (C, H, W) in [-1, 1], label or
None)``; the latent cache (data/latents.py) has the same interface with moments in place of pixels.
"""

from __future__ import annotations

import numpy as np
import torch

from .digits import digits_tensors
from .sources import BadImage, crop_image
from ..errors import UvitError


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 HWC (or HW) -> float CHW in [-1, 1]."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.array(arr)).permute(2, 0, 1).float().div(127.5).sub(1.0)  # a writable copy


class DigitsSource:
    """scikit-learn's 8x8 digits, in memory (1 channel)."""

    num_classes = 10

    def __init__(self):
        self.x, self.y = digits_tensors()
        self._labels = self.y.tolist()   # Python ints: the stream reads one per example

    def __len__(self):
        return len(self.x)

    def get(self, i: int, flip: bool = False):
        x = self.x[i]
        return (x.flip(-1) if flip else x), self._labels[i]


class PixelSource:
    """Images of a data/sources.py source (a folder or a Hugging Face data set), cropped to ``resolution``."""

    def __init__(self, source, resolution: int, crop: str):
        self.source, self.resolution, self.crop = source, resolution, crop
        self.num_classes = len(source.class_names or []) if source.conditioning == "class" else 0

    def __len__(self):
        return len(self.source)

    def get(self, i: int, flip: bool = False):
        try:
            img, _ = self.source.load(i)
        except BadImage as e:
            raise UvitError(f"training image {self.source.record(i).key} of {self.source.location} is unusable "
                            f"({e}); remove it, or encode the data with `uvit encode-latents`, which skips such "
                            "files") from None
        x = to_tensor(crop_image(img, self.crop, self.resolution))
        label = self.source.record(i).label
        return (x.flip(-1) if flip else x), (label if label >= 0 else None)
