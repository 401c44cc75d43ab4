"""Shared builders for the metrics tests: random-weight FID Inception files and small image sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from photos import photo_crops  # noqa: F401 - the image sets of the metrics tests: crops of real photos
from PIL import Image

from uvit_cli.metrics.inception import WEIGHTS_FILE, random_state_dict


def write_random_inception(torch_home: Path, seed: int = 0) -> Path:
    """A random FID Inception saved where torch hub (and so pytorch-fid / clean-fid) looks for the real file."""
    path = torch_home / "hub" / "checkpoints" / WEIGHTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        torch.save(random_state_dict(seed), path)
    return path


def write_pngs(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img.squeeze()).save(folder / f"{i:05d}.png")
    return folder
