"""Which caption conditions each evaluation sample of a text-to-image model: the MS-COCO protocol.

The official evaluation (baofff/U-ViT ``eval_t2i_discrete.py``; ``train_t2i_discrete.py`` evaluates the same way)
reads prompts from the val2014 feature set (40,504 images) through a DataLoader with ``shuffle=True``: images in
a random order without repeats (30,000 are used), each with one of its captions chosen by
``random.randint(0, n_captions - 1)``, i.e. uniformly over the 5 to 7 it has. Neither draw is seeded there, and
with several GPUs each process reads its own shard of the shuffled set. Here the same distribution is drawn
reproducibly: a permutation of the images from ``numpy.random.default_rng(seed)`` (another permutation follows
when more samples than images are asked for), then one caption index per sample, uniform over that image's
captions, from the same generator. The protocol card records the seed, the counts and the SHA-256 of the
(image, caption) index pairs, so two results name the same captions exactly when their hashes agree.

A caption set is anything with ``len()``, ``caption_counts`` (captions per item) and ``context(i, k)`` (caption k
of item i as a (tokens, width) tensor), as ``data/latents.LatentDataset`` has for an encoded val cache
(``uvit encode-latents coco --split val``); with ``flips`` true, odd items mirror the even ones and only even
items are drawn. A set with ``labels`` (the built-in captioned digits) also gives each sample the class of the image
its caption was drawn from, so the digits metric can check that the asked digit was drawn. A prompts file instead conditions sample i on prompt i mod P, in order (a pinned caption list).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import numpy as np
import torch

from ..errors import UvitError


class CaptionSet(Protocol):
    caption_counts: np.ndarray          # captions of each item

    def __len__(self) -> int: ...

    def context(self, i: int, k: int) -> torch.Tensor: ...   # caption k of item i, (tokens, width)


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<i8").tobytes()).hexdigest()


def draw_captions(captions: CaptionSet, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(item (n,), caption index (n,)): images in seeded random orders without repeats, one caption each drawn
    uniformly from that image's captions."""
    counts = np.asarray(captions.caption_counts, dtype=np.int64)
    images = np.arange(0, len(captions), 2 if getattr(captions, "flips", False) else 1)
    if len(images) == 0:
        raise UvitError("the caption set is empty; encode the val split with `uvit encode-latents coco --split val`")
    if (counts[images] < 1).any():
        bad = int(images[counts[images] < 1][0])
        raise UvitError(f"item {bad} of the caption set has no captions; re-encode the val split")
    rng = np.random.default_rng(seed)
    orders = [rng.permutation(images) for _ in range(-(-n // len(images)))]
    items = np.concatenate(orders)[:n]
    ks = rng.integers(0, counts[items])
    return items, ks


class CaptionConditions:
    """Text contexts of evaluation samples [start, stop), the null context for guidance, and the draw's card."""

    def __init__(self, contexts: Callable[[int, int], torch.Tensor], null_context: Optional[torch.Tensor],
                 card: dict, labels: Optional[np.ndarray] = None):
        self._contexts, self.null_context, self.card = contexts, null_context, card
        self.labels = labels            # class of the image each caption came from, when the set has classes

    def contexts(self, start: int, stop: int) -> torch.Tensor:
        return self._contexts(start, stop).float()


def cache_conditions(captions: CaptionSet, n: int, seed: int, source: str = "",
                     source_sha256: str = "") -> CaptionConditions:
    """The MS-COCO protocol over an encoded caption set (see the module docstring)."""
    items, ks = draw_captions(captions, n, seed)
    counts = np.asarray(captions.caption_counts)
    m = len(np.unique(items))
    images = len(range(0, len(captions), 2 if getattr(captions, "flips", False) else 1))
    order = "without repeats" if n <= images else f"a new order after every {images} samples"
    card = {"captions": f"MS-COCO protocol: {n} samples over {images} images in seeded random order ({order}), one "
                        f"caption each, drawn uniformly from the image's {int(counts.min())}-{int(counts.max())} "
                        "captions",
            "caption_source": source, "caption_images": images, "caption_distinct_images": m,
            "caption_seed": seed, "caption_draw_sha256": _sha256(np.stack([items, ks], axis=1))}
    if source_sha256:
        card["caption_source_sha256"] = source_sha256
    null = getattr(captions, "null_context", None)

    def contexts(start: int, stop: int) -> torch.Tensor:
        return torch.stack([captions.context(int(i), int(k)) for i, k in zip(items[start:stop], ks[start:stop])])

    classes = getattr(captions, "labels", None)
    labels = None if classes is None else np.asarray(classes, dtype=np.int64)[items]
    return CaptionConditions(contexts, None if null is None else torch.as_tensor(null).float(), card, labels)


def prompt_conditions(prompts: Sequence[str], encoder, n: int, source: str = "",
                      micro_batch: int = 16) -> CaptionConditions:
    """Sample i gets prompt i mod P, encoded with ``encoder`` chunk by chunk in fixed micro-batches (so a chunk's
    contexts equal one pass over all prompts, and 30,000 contexts never sit in memory at once)."""
    prompts = list(prompts)
    if not prompts:
        raise UvitError(f"the prompts file {source} holds no prompts (one per line)")
    used = [prompts[i % len(prompts)] for i in range(n)]
    card = {"captions": f"prompts file in order: sample i gets prompt i mod {len(prompts)}",
            "caption_source": source, "prompts": len(prompts),
            "caption_draw_sha256": hashlib.sha256("\n".join(used).encode()).hexdigest()}

    def contexts(start: int, stop: int) -> torch.Tensor:
        return encoder.encode_fixed(used[start:stop], micro_batch).cpu()

    return CaptionConditions(contexts, encoder.encode_fixed([""], micro_batch)[0].cpu(), card)


def read_prompts_file(path: Path) -> list[str]:
    """The non-empty lines of a prompts file, stripped; a missing, non-text or empty file is a UvitError."""
    path = Path(path)
    if not path.is_file():
        raise UvitError(f"--prompts-file {path} does not exist (or is not a file)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UvitError(f"--prompts-file {path} is not UTF-8 text; write one prompt per line") from None
    found = [line.strip() for line in lines if line.strip()]
    if not found:
        raise UvitError(f"--prompts-file {path} holds no prompts (empty or blank lines only); write one prompt per "
                        "line (--prompt \"\" asks for the unconditional prompt)")
    return found
