"""The latent cache on disk: sharded safetensors + ``manifest.json``; shard writing, verification, the reader
the trainer uses, and the recipe check.

Layout of a cache directory::

    encode_config.json        settings of the run (a rerun with other settings is refused)
    null_context.safetensors  the empty prompt's CLIP context (text data only)
    shards/shard-00000.safetensors + shard-00000.json (completion mark: count, sha256, skipped, stats)
    manifest.json             written last, once every shard is complete

A shard holds ``moments`` fp16 (n, 2C, h, w) [mean | logvar], ``moments_flip`` (when flips are stored),
``labels`` int64 (n,) (-1 without classes), ``source_index`` int64 (n,), and for text data ``contexts`` fp16
(m, 77, 768) with ``caption_offsets`` int64 (n + 1,). Shard and mark files are written atomically, so a
partial shard never looks complete.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import UvitError
from ..files import read_json, sha256_file, write_json, write_safetensors

log = logging.getLogger(__name__)

FORMAT = "uvit-latents-1"
MANIFEST = "manifest.json"
CONFIG = "encode_config.json"
NULL_CONTEXT = "null_context.safetensors"
SHARD_DIR = "shards"


def shard_name(s: int) -> str:
    return f"shard-{s:05d}"


def write_shard(root: Path, s: int, tensors: dict, mark: dict) -> dict:
    """Write shard ``s`` atomically, then its completion mark (count, bytes, sha256 + ``mark``). Returns the mark."""
    path = root / SHARD_DIR / f"{shard_name(s)}.safetensors"
    write_safetensors(path, tensors, {"format": FORMAT})
    mark = dict(mark, file=f"{SHARD_DIR}/{path.name}", bytes=path.stat().st_size, sha256=sha256_file(path))
    write_json(root / SHARD_DIR / f"{shard_name(s)}.json", mark)
    return mark


def completed_shards(root: Path, num_shards: int) -> dict[int, dict]:
    """Shards whose mark exists and whose file is present with the marked size (others are redone)."""
    done = {}
    for s in range(num_shards):
        mark_path = root / SHARD_DIR / f"{shard_name(s)}.json"
        if not mark_path.is_file():
            continue
        try:
            mark = read_json(mark_path)
        except (json.JSONDecodeError, OSError):
            continue
        f = root / mark.get("file", "")
        if f.is_file() and f.stat().st_size == mark.get("bytes"):
            done[s] = mark
    return done


def remove_stale_temporaries(root: Path, shards) -> None:
    """Delete temporary files a killed run left behind for the given shards (never another rank's)."""
    d = root / SHARD_DIR
    if not d.is_dir():
        return
    prefixes = tuple(f".{shard_name(s)}." for s in shards)
    for p in d.iterdir():
        if p.name.startswith(prefixes) and p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)


def merge_stats(marks: list[dict]) -> dict:
    """Pool the per-shard sums of the latent mean / variance into the std of z and of the mean."""
    n = sum(m["stats"]["n"] for m in marks)
    if n == 0:
        return {"values": 0}
    s = sum(m["stats"]["sum"] for m in marks)
    ss = sum(m["stats"]["sumsq"] for m in marks)
    sv = sum(m["stats"]["sumvar"] for m in marks)
    mean = s / n
    var_mean = max(ss / n - mean * mean, 0.0)
    return {"values": n, "mean": round(mean, 6), "std_of_mean": round(math.sqrt(var_mean), 6),
            "std": round(math.sqrt(var_mean + sv / n), 6)}   # std of z = mean + std * noise (unscaled)


def build_manifest(root: Path, config: dict, marks: dict[int, dict], null_context: dict | None) -> dict:
    """The manifest: the run's settings, every shard with its checksum, the skipped files, the totals."""
    shards = [marks[s] for s in sorted(marks)]
    skipped = [x for m in shards for x in m["skipped"]]
    converted: dict[str, int] = {}
    for m in shards:
        for k, v in m["converted"].items():
            converted[k] = converted.get(k, 0) + v
    count = sum(m["count"] for m in shards)
    manifest = dict(config)
    manifest.update(
        format=FORMAT, stored="moments", dtype="float16",
        count=count, num_items=count * (2 if config["flips"] else 1),
        num_captions=sum(m.get("captions", 0) for m in shards),
        num_skipped=len(skipped), skipped=skipped, converted=converted,
        latent_stats=merge_stats(shards), null_context=null_context,
        shards=[{k: m[k] for k in ("file", "count", "captions", "first", "stop", "bytes", "sha256")} for m in shards],
    )
    return manifest


# ---------------------------------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------------------------------

def verify_latents(root: str | Path, progress=None) -> dict:
    """Re-read every shard: file checksums, tensor shapes and counts, finite values; UvitError listing problems."""
    root = Path(root)
    manifest = _read_manifest(root)
    problems, total, caps = [], 0, 0
    c, h = manifest["latent_channels"] * 2, manifest["latent_size"]
    for i, sh in enumerate(manifest["shards"]):
        path = root / sh["file"]
        if not path.is_file():
            problems.append(f"{sh['file']} is missing")
            continue
        if sha256_file(path) != sh["sha256"]:
            problems.append(f"{sh['file']}: checksum mismatch (file changed or damaged)")
            continue
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            m = f.get_tensor("moments")
            n = sh["count"]
            if tuple(m.shape) != (n, c, h, h) or m.dtype != torch.float16:
                problems.append(f"{sh['file']}: moments {tuple(m.shape)} {m.dtype}, expected ({n}, {c}, {h}, {h}) fp16")
            if not torch.isfinite(m).all():
                problems.append(f"{sh['file']}: non-finite moments")
            if manifest["flips"] and ("moments_flip" not in keys or f.get_slice("moments_flip").get_shape()[0] != n):
                problems.append(f"{sh['file']}: flipped moments missing or short")
            if f.get_slice("labels").get_shape() != [n]:
                problems.append(f"{sh['file']}: {f.get_slice('labels').get_shape()} labels for {n} images")
            if manifest["conditioning"] == "text":
                off = f.get_tensor("caption_offsets")
                ctx = f.get_slice("contexts").get_shape()
                if len(off) != n + 1 or int(off[-1]) != ctx[0] or ctx[0] != sh["captions"]:
                    problems.append(f"{sh['file']}: caption offsets do not match the {ctx[0]} contexts")
                caps += ctx[0]
        total += sh["count"]
        if progress:
            progress(i + 1, len(manifest["shards"]))
    if total != manifest["count"]:
        problems.append(f"shards hold {total} images, the manifest says {manifest['count']}")
    nc = manifest.get("null_context")
    if nc and (not (root / nc["file"]).is_file() or sha256_file(root / nc["file"]) != nc["sha256"]):
        problems.append(f"{nc['file']} missing or checksum mismatch")
    if problems:
        raise UvitError(f"{root}: {len(problems)} problem(s): " + "; ".join(problems[:5])
                        + ("" if len(problems) <= 5 else f"; ... ({len(problems) - 5} more)")
                        + ". Delete the damaged shard files and their .json marks, then rerun encode-latents")
    return {"shards": len(manifest["shards"]), "count": total, "captions": caps}


# ---------------------------------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------------------------------

def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        hint = ("the encode has not finished: rerun the same `uvit encode-latents` command to complete it"
                if (root / CONFIG).is_file() else "run `uvit encode-latents` to create it")
        raise UvitError(f"{root} has no {MANIFEST}; {hint}")
    manifest = read_json(path)
    if manifest.get("format") != FORMAT:
        raise UvitError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


class LatentDataset(torch.utils.data.Dataset):
    """Items of a latent cache. Class/unconditional data: ``ds[i] -> (moments fp16 (2C,h,w), label int64 or -1)``;
    text data: ``ds[(i, k)] -> (moments, context k fp16 (77, 768))`` with k < ``caption_counts[i]``
    (``num_captions``, an int, is the count every item has; ``ds[i]`` alone gives caption 0).

    With flips stored, item 2j is image j and item 2j + 1 its mirror (the official cache holds both).
    """

    MAX_OPEN = 64

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest = _read_manifest(self.root)
        if not self.manifest.get("count"):
            raise UvitError(f"the latent cache {self.root} holds no images; encode a data set with usable images "
                            "(`uvit encode-latents` lists what it skipped and why)")
        self.flips = bool(self.manifest["flips"])
        self.num_classes = len(self.manifest.get("class_names") or [])
        self.is_text = self.manifest["conditioning"] == "text"
        self._files = [self.root / s["file"] for s in self.manifest["shards"]]
        self._starts = np.cumsum([0] + [s["count"] for s in self.manifest["shards"]]).tolist()
        labels, offsets = [], []
        for f in self._files:
            with safe_open(str(f), framework="pt") as h:
                labels.append(h.get_tensor("labels").numpy())
                if self.is_text:
                    offsets.append(h.get_tensor("caption_offsets").numpy())
        labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        self._offsets = offsets
        rep = 2 if self.flips else 1
        self.labels = np.repeat(labels, rep)                       # per item
        # captions per item (text data), and the count every item has: a trainer draws k < num_captions (COCO: 5;
        # the few images with 6 or 7 captions keep the extra ones, reachable through caption_counts)
        self.caption_counts = (np.repeat(np.concatenate([np.diff(o) for o in offsets]), rep)
                               if self.is_text and offsets else None)
        self.num_captions = int(self.caption_counts.min()) if self.caption_counts is not None and \
            len(self.caption_counts) else 0
        self.null_context = None
        if self.manifest.get("null_context"):
            self.null_context = load_file(str(self.root / NULL_CONTEXT))["context"]
        self._handles: OrderedDict = OrderedDict()
        self._pid = None

    def __len__(self) -> int:
        return self._starts[-1] * (2 if self.flips else 1)

    def _handle(self, s: int):
        """An open shard; at most MAX_OPEN per process (ImageNet has ~1,300 shards), reopened per worker."""
        if self._pid != os.getpid():            # DataLoader workers open their own handles
            self._handles, self._pid = OrderedDict(), os.getpid()
        if s in self._handles:
            self._handles.move_to_end(s)
        else:
            self._handles[s] = safe_open(str(self._files[s]), framework="pt")
            if len(self._handles) > self.MAX_OPEN:
                self._handles.popitem(last=False)
        return self._handles[s]

    def _locate(self, i: int) -> tuple[int, int, int]:
        """(shard, row in the shard, flipped) of item i."""
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} items")
        j, flip = (i // 2, i % 2) if self.flips else (i, 0)
        s = bisect.bisect_right(self._starts, j) - 1
        return s, j - self._starts[s], flip

    def _context(self, s: int, r: int, i: int, k: int) -> torch.Tensor:
        lo, hi = int(self._offsets[s][r]), int(self._offsets[s][r + 1])
        if not 0 <= k < hi - lo:
            raise IndexError(f"caption {k} out of range: item {i} has {hi - lo} captions")
        return self._handle(s).get_slice("contexts")[lo + k:lo + k + 1][0]

    def __getitem__(self, index):
        i, k = index if isinstance(index, tuple) else (index, 0)
        s, r, flip = self._locate(i)
        moments = self._handle(s).get_slice("moments_flip" if flip else "moments")[r:r + 1][0]
        if not self.is_text:
            return moments, torch.tensor(int(self.labels[i]), dtype=torch.int64)
        return moments, self._context(s, r, i, k)

    def context(self, i: int, k: int) -> torch.Tensor:
        """Caption k's context (fp16 (77, D)) of item i, without reading its latents (the caption protocol)."""
        if not self.is_text:
            raise UvitError(f"{self.root} holds no captions (it was encoded from {self.manifest['conditioning']} data)")
        s, r, _ = self._locate(i)
        return self._context(s, r, i, k)

    def get(self, i: int, flip: bool = False, caption: int | None = None):
        """The training-source interface (data/pixels.py): (moments, label or None) or (moments, caption's context).
        Flips are stored as separate items (the official ImageNet features), never applied here."""
        if self.is_text:
            moments, context = self[(i, caption or 0)]
            return moments, context.float()
        moments, label = self[i]
        return moments, (None if int(label) < 0 else int(label))


def open_latents(path: str | Path) -> LatentDataset:
    """Open a finished latent cache directory written by `uvit encode-latents`."""
    return LatentDataset(path)


def check_latents_against_recipe(data, recipe) -> None:
    """Refuse a cache whose manifest disagrees with the recipe (UvitError naming each field and the fix); log the
    latent std times the scale factor (about 1.0 when the scale factor fits the VAE)."""
    manifest = data.manifest if isinstance(data, LatentDataset) else \
        _read_manifest(Path(data)) if isinstance(data, (str, Path)) else data
    m, d = recipe.model, recipe.data
    bad = []
    res = manifest["resolution"]
    if res != m.img_size * manifest.get("downsample", 8):
        bad.append(f"resolution {res} (latents {manifest['latent_size']}) but model.img_size={m.img_size}: set "
                   f"model.img_size={manifest['latent_size']} or encode at --res {m.img_size * 8}")
    if m.in_chans != manifest["latent_channels"]:
        bad.append(f"{manifest['latent_channels']} latent channels but model.in_chans={m.in_chans}")
    if abs(d.scale_factor - manifest["scale_factor"]) > 1e-6:
        bad.append(f"scale factor {manifest['scale_factor']} but data.scale_factor={d.scale_factor}: set "
                   f"data.scale_factor={manifest['scale_factor']} or re-encode with --scale-factor")
    if d.vae != manifest["vae"]:
        bad.append(f"encoded with VAE {manifest['vae']!r} (sha256 {manifest['vae_sha256'][:12]}) but data.vae="
                   f"{d.vae!r}: set data.vae={manifest['vae']} so samples decode with the same VAE")
    if m.text_dim > 0:
        if manifest["conditioning"] != "text":
            bad.append("the model is text-conditional but the cache holds no caption features")
        else:
            if d.text_encoder != manifest["text_encoder"]:
                bad.append(f"captions encoded with {manifest['text_encoder']!r} but data.text_encoder="
                           f"{d.text_encoder!r}: set data.text_encoder={manifest['text_encoder']}")
            if [m.text_tokens, m.text_dim] != manifest["context_shape"]:
                bad.append(f"text features are {manifest['context_shape']} but the model expects "
                           f"[{m.text_tokens}, {m.text_dim}] (model.text_tokens, model.text_dim)")
    if m.num_classes > 0:
        n = len(manifest.get("class_names") or [])
        if n != m.num_classes:
            bad.append(f"the cache has {n} classes but model.num_classes={m.num_classes}"
                       + ("" if n else " (it holds no labels: encode a data set with classes)"))
    if bad:
        raise UvitError("latent cache does not match the recipe: " + "; ".join(bad))
    stats = manifest.get("latent_stats") or {}
    if stats.get("values"):
        scaled = stats["std"] * d.scale_factor
        log.info("latent std x scale factor = %.3f x %g = %.3f (about 1.0 expected)", stats["std"],
                 d.scale_factor, scaled)
        if not 0.5 <= scaled <= 2.0:
            log.warning("scaled latent std %.3f is far from 1.0: is data.scale_factor right for this VAE?", scaled)
