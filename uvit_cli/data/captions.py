"""The built-in captioned digits: phrasings of each 8x8 digit from its label and its stroke weight, a held-out set
of phrasings for scoring, and their text features in the latent cache's caption layout.

Every digit gets the training phrasings ("a handwritten seven", "the digit 7", "7, written by hand", ...; "thick"
or "thin" where its ink is in the top or bottom third of its class) and, apart, held-out phrasings that combine the
same words in other ways ("seven, drawn by hand", ...) for `uvit fid`. The captions go through the project's real
text path (open_clip tokenizer, TextEncoder with Stable Diffusion's end-of-text padding, the empty prompt as the
null context). The cache holds, per split, ``images`` uint8 (n, 8, 8), ``labels``, ``contexts`` fp16 (m, T, D) and
``caption_offsets`` (n + 1,) (the keys and layout of a latent shard's captions), plus ``null_context.safetensors``,
the caption strings and a manifest naming the text encoder and its SHA-256.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..errors import UvitError
from ..files import cache_dir, read_json, read_safetensors, write_json, write_safetensors
from .digits import load_digits_uint8

log = logging.getLogger(__name__)

FORMAT = "uvit-digits-captions-1"
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {w}: the digit's word, {d}: the numeral; {weight}: "thick " / "thin " / "" from the stroke weight.
TRAIN_PHRASINGS = ("a handwritten {w}", "the digit {d}", "{d}, written by hand", "a {weight}{w}",
                   "the number {w}", "a {weight}handwritten {d}")
HELD_OUT_PHRASINGS = ("{w}, written by hand", "the handwritten number {d}", "a {weight}digit {w}")
SPLITS = ("train", "val")


def stroke_weights(images: np.ndarray, labels: np.ndarray) -> list[str]:
    """"thick " / "thin " for digits whose ink (sum of gray levels) is in the top / bottom third of their class."""
    ink = images.reshape(len(images), -1).astype(np.float64).sum(1)
    out = [""] * len(images)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        lo, hi = np.quantile(ink[idx], [1 / 3, 2 / 3])
        for i in idx:
            out[i] = "thick " if ink[i] > hi else "thin " if ink[i] < lo else ""
    return out


def captions_of(label: int, weight: str, phrasings) -> tuple[str, ...]:
    """The distinct captions of one digit (a "{weight}" phrasing without a weight repeats a plainer one)."""
    caps = (p.format(w=WORDS[label], d=label, weight=weight) for p in phrasings)
    return tuple(dict.fromkeys(caps))


def digit_captions(split: str = "train") -> tuple[np.ndarray, np.ndarray, list[tuple[str, ...]]]:
    """(images uint8 (1797, 8, 8), labels, captions per image) of the built-in digits for ``split``."""
    if split not in SPLITS:
        raise UvitError(f"the captioned digits have splits {', '.join(SPLITS)}, not {split!r}")
    images, labels = load_digits_uint8()
    weights = stroke_weights(images, labels)
    phrasings = TRAIN_PHRASINGS if split == "train" else HELD_OUT_PHRASINGS
    return images, labels, [captions_of(int(c), w, phrasings) for c, w in zip(labels, weights)]


# ---------------------------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------------------------

def cache_path(encoder) -> Path:
    """Where the captions encoded by ``encoder`` are kept: one directory per text encoder (by weights hash)."""
    return cache_dir() / "digits_captions" / f"{FORMAT}-{encoder.sha256[:16]}"


def build_caption_cache(encoder, root: Path | None = None) -> Path:
    """Encode every caption of both splits (and the empty prompt) with ``encoder``; the manifest is written last,
    so a half-written cache is rebuilt, never read."""
    root = Path(root or cache_path(encoder))
    if (root / "manifest.json").is_file():
        return root
    shape = [encoder.context_length, encoder.width]
    for split in SPLITS:
        images, labels, captions = digit_captions(split)
        unique = sorted({c for caps in captions for c in caps})
        feats = encoder.encode(unique).to(torch.float16).cpu()
        index = {c: i for i, c in enumerate(unique)}
        rows = [index[c] for caps in captions for c in caps]
        counts = [len(caps) for caps in captions]
        write_safetensors(root / f"{split}.safetensors", {
            "images": torch.from_numpy(images), "labels": torch.from_numpy(labels),
            "contexts": feats[rows].contiguous(),
            "caption_offsets": torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)}, {"format": FORMAT})
        write_json(root / f"{split}_captions.json", captions)
    write_safetensors(root / "null_context.safetensors",
                      {"context": encoder.encode([""])[0].to(torch.float16).cpu().contiguous()}, {"prompt": ""})
    write_json(root / "manifest.json", {"format": FORMAT, "text_encoder": encoder.name,
                                        "text_encoder_sha256": encoder.sha256, "context_shape": shape,
                                        "train_phrasings": TRAIN_PHRASINGS, "held_out_phrasings": HELD_OUT_PHRASINGS})
    log.info("encoded the digits captions with %s into %s", encoder.name, root)
    return root


class CaptionedDigits:
    """One split of the captioned digits as a training source (``get(i, flip, caption)`` -> (image in [-1, 1],
    caption k's context), like a latent cache) and as the caption set of `uvit fid`'s text protocol."""

    num_classes = 0

    def __init__(self, root: str | Path, split: str = "train"):
        self.root, self.split = Path(root), split
        self.manifest = read_json(self.root / "manifest.json")
        if self.manifest.get("format") != FORMAT:
            raise UvitError(f"{self.root} is not a digits caption cache (format {self.manifest.get('format')!r})")
        with safe_open(str(self.root / f"{split}.safetensors"), framework="pt") as f:
            self.images = f.get_tensor("images").float().div(127.5).sub(1.0)[:, None]      # (n, 1, 8, 8)
            self.labels = f.get_tensor("labels")
            self.contexts = f.get_tensor("contexts")
            self.offsets = f.get_tensor("caption_offsets")
        self.caption_counts = np.diff(self.offsets.numpy())
        self.num_captions = int(self.caption_counts.min())
        self.captions = [tuple(c) for c in read_json(self.root / f"{split}_captions.json")]
        self.null_context = read_safetensors(self.root / "null_context.safetensors")["context"]

    def __len__(self) -> int:
        return len(self.images)

    def context(self, i: int, k: int) -> torch.Tensor:
        """Caption k of image i as text features (T, D), float32."""
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        if not 0 <= k < hi - lo:
            raise IndexError(f"caption {k} out of range: image {i} has {hi - lo} captions")
        return self.contexts[lo + k].float()

    def get(self, i: int, flip: bool = False, caption: int = 0):
        x = self.images[i]
        return (x.flip(-1) if flip else x), self.context(i, caption)


def open_captioned_digits(encoder, split: str = "train") -> CaptionedDigits:
    """The captioned digits encoded by ``encoder`` (the cache is built on first use)."""
    return CaptionedDigits(build_caption_cache(encoder), split)
