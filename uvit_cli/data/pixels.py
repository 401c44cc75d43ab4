"""Pixel data sources for training: the built-in digits, Hugging Face data sets, and local image folders.

A source has ``len(source)``, ``num_classes`` and ``get(i, flip) -> (image (C, H, W) in [-1, 1], label or None)``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import UvitError

log = logging.getLogger(__name__)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 HWC (or HW) -> float CHW in [-1, 1]."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div(127.5).sub(1.0)


class DigitsSource:
    """scikit-learn's 8x8 digits, in memory (1 channel)."""

    num_classes = 10

    def __init__(self):
        from .digits import digits_tensors

        self.x, self.y = digits_tensors()

    def __len__(self):
        return len(self.x)

    def get(self, i: int, flip: bool = False):
        x = self.x[i]
        return (x.flip(-1) if flip else x), int(self.y[i])


def preprocess(img, resolution: int, crop: str) -> np.ndarray:
    """A PIL image -> uint8 HWC RGB at the target resolution with the official crop of its data set."""
    from PIL import Image

    img = img.convert("RGB")
    if crop == "celeba":
        # Official CelebA: a 128x128 box centred at (row 121, col 89) of the aligned 178x218 image, then resize.
        img = img.crop((89 - 64, 121 - 64, 89 + 64, 121 + 64))
        img = img.resize((resolution, resolution), Image.BILINEAR)
    elif crop in ("adm_center", "center_lanczos"):
        from .images import adm_center_crop, center_crop_lanczos

        img = adm_center_crop(img, resolution) if crop == "adm_center" else center_crop_lanczos(img, resolution)
    elif img.size != (resolution, resolution):
        raise UvitError(f"an image of size {img.size} does not match the model's {resolution}x{resolution}; "
                        "set data.crop: adm_center (or resize the data)")
    return np.asarray(img, dtype=np.uint8)


class HFSource:
    """A Hugging Face data set (``hf:NAME`` from the local cache, or a directory saved with ``save_to_disk``)."""

    def __init__(self, source: str, split: str, resolution: int, crop: str):
        import datasets

        self.resolution, self.crop = resolution, crop
        try:
            if source.startswith("hf:"):
                self.ds = datasets.load_dataset(source[3:], split=split)
            else:
                ds = datasets.load_from_disk(source)
                self.ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        except (FileNotFoundError, ConnectionError, ValueError, OSError) as e:
            raise UvitError(f"could not open the data set {source!r} split {split!r} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}); download it first (HF_HUB_OFFLINE=0 "
                            "datasets.load_dataset) or set data.source to a local path") from None
        cols = self.ds.column_names
        self.image_col = next((c for c in ("img", "image", "jpg", "png") if c in cols), None)
        if self.image_col is None:
            raise UvitError(f"data set {source!r} has no image column (columns: {', '.join(cols)})")
        self.label_col = next((c for c in ("label", "labels", "fine_label", "cls") if c in cols), None)
        feat = self.ds.features.get(self.label_col) if self.label_col else None
        self.num_classes = len(feat.names) if hasattr(feat, "names") else 0

    def __len__(self):
        return len(self.ds)

    def get(self, i: int, flip: bool = False):
        row = self.ds[int(i)]
        arr = preprocess(row[self.image_col], self.resolution, self.crop)
        x = to_tensor(arr)
        return (x.flip(-1) if flip else x), (int(row[self.label_col]) if self.label_col else None)


class FolderSource:
    """Images under a directory; labels from sub-folder names (sorted), or none when the images lie flat."""

    def __init__(self, root: str, resolution: int, crop: str):
        root_p = Path(root)
        if not root_p.is_dir():
            raise UvitError(f"image folder {root} does not exist; set data.source to a directory of images")
        self.files = sorted(p for p in root_p.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        if not self.files:
            raise UvitError(f"no images under {root} (looked for {', '.join(sorted(IMAGE_EXTS))})")
        classes = sorted({p.parent.relative_to(root_p).as_posix() for p in self.files} - {"."})
        self.class_names = classes
        self.num_classes = len(classes)
        self.labels = [classes.index(p.parent.relative_to(root_p).as_posix()) if classes else None
                       for p in self.files]
        self.resolution, self.crop = resolution, crop

    def __len__(self):
        return len(self.files)

    def get(self, i: int, flip: bool = False):
        from PIL import Image

        with Image.open(self.files[i]) as img:
            arr = preprocess(img, self.resolution, self.crop)
        x = to_tensor(arr)
        return (x.flip(-1) if flip else x), self.labels[i]


class LatentSource:
    """Adapts a latent cache (uvit_cli/data/latents.py) to the source interface: x is the VAE moments
    (mean ‖ logvar, drawn into a latent by the stream); y is the label, or caption k's text context."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.num_classes = getattr(dataset, "num_classes", 0) or 0
        self.num_captions = getattr(dataset, "num_captions", 0) or 0
        self.null_context = getattr(dataset, "null_context", None)

    def __len__(self):
        return len(self.dataset)

    def get(self, i: int, flip: bool = False, caption: int | None = None):
        # Flips are stored in the cache as separate entries (the official ImageNet features), never applied here.
        if caption is not None:
            moments, context = self.dataset[(i, caption)]
            return moments, context.float()
        moments, label = self.dataset[i]
        label = int(label)
        return moments, (None if label < 0 else label)
