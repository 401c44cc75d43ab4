"""The official crops: ADM's center crop (ImageNet), the MS-COCO center crop + LANCZOS, the CelebA box, none.

Each crop maps a PIL RGB image and a target size to uint8 (size, size, 3); ``DEFAULT_CROP`` names the official one
of each data set kind (what ``data.crop: auto`` and ``encode-latents --crop auto`` pick).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..errors import UvitError


def adm_center_crop(img, size: int) -> np.ndarray:
    """ADM / guided-diffusion center crop (the official ImageNet one): halve with BOX while the short side is at
    least twice the target, BICUBIC-resize the short side to ``size``, then center crop. uint8 (size, size, 3)."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[y:y + size, x:x + size])


def center_crop_lanczos(img, size: int) -> np.ndarray:
    """The official MS-COCO crop: center-crop the array to its short side, then LANCZOS-resize to ``size``."""
    arr = np.asarray(img)
    c = min(arr.shape[:2])
    arr = arr[(arr.shape[0] - c) // 2:(arr.shape[0] + c) // 2, (arr.shape[1] - c) // 2:(arr.shape[1] + c) // 2]
    return np.asarray(Image.fromarray(arr).resize((size, size), resample=Image.LANCZOS))


def celeba_crop(img, size: int) -> np.ndarray:
    """The official CelebA crop: a 128x128 box centred at (row 121, col 89) of the aligned 178x218 image, then a
    BILINEAR resize to ``size``."""
    img = img.crop((89 - 64, 121 - 64, 89 + 64, 121 + 64))
    return np.asarray(img.resize((size, size), Image.BILINEAR))


def no_crop(img, size: int) -> np.ndarray:
    """The image as it is (CIFAR10); it must already be size x size."""
    if img.size != (size, size):
        raise UvitError(f"an image of size {img.size} does not match the model's {size}x{size}; "
                        "set data.crop: adm_center (or resize the data)")
    return np.asarray(img)


# crop name (recipe.Crop without "auto") -> PIL RGB image, size -> uint8 (size, size, 3)
CROPS = {"adm_center": adm_center_crop, "center_lanczos": center_crop_lanczos, "celeba": celeba_crop,
         "none": no_crop}

# The official crop of each data set kind ("auto"): training sets and the encode-latents sources.
DEFAULT_CROP = {"cifar10": "none", "celeba64": "celeba", "imagenet64": "adm_center", "imagenet": "adm_center",
                "coco": "center_lanczos", "folder": "adm_center"}


def crop_image(img, crop: str, size: int) -> np.ndarray:
    """``img`` (PIL, any mode) as uint8 (size, size, 3) RGB through the named crop."""
    if crop not in CROPS:
        raise UvitError(f"unknown crop {crop!r}; use one of {', '.join(CROPS)}")
    return CROPS[crop](img.convert("RGB"), size)


