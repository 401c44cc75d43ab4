"""Image sources: ImageNet, MS-COCO 2014 and any folder, as local trees or Hugging Face `datasets`.

A source is an indexable list of items: ``record(i)`` gives the label / captions / name without touching pixels,
``load(i)`` opens the image. Bad images are converted to RGB when possible (CMYK, grayscale, palette, alpha) and
otherwise reported as :class:`BadImage` so the encoder can skip, count and list them.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UvitError
from ..files import IMAGE_SUFFIXES
from ..hub import offline_unless
from .crops import crop_image

log = logging.getLogger(__name__)

LABEL_KEYS = ("label", "labels", "fine_label", "cls")
HF_DISK_MARKERS = ("state.json", "dataset_dict.json", "dataset_info.json")  # a `save_to_disk` directory
CAPTION_FILES = ("captions.jsonl", "metadata.jsonl")
CAPTION_KEYS = ("captions", "caption", "text", "sentences")


class BadImage(Exception):
    """An image that cannot be used (truncated, corrupt, unreadable); the message is the reason."""


@dataclass(frozen=True)
class Record:
    key: str                    # file path (relative to the source) or "hf:<row>", for listing skipped items
    label: int = -1             # class index, -1 without classes
    captions: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------------------------------
# Decoding and crops
# ---------------------------------------------------------------------------------------------------------------------

def to_rgb(img) -> tuple[object, str]:
    """(RGB PIL image, the original mode when it was converted else ""). Alpha is composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img, ""
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):   # 16/32-bit grayscale: scale to 8 bits before converting
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB"), mode
    return img.convert("RGB"), mode


def open_image(fp, orient: bool = False) -> tuple[object, str]:
    """Decode an image file (path or file object) fully; BadImage when it is truncated or corrupt. ``orient``
    turns the pixels upright by the EXIF orientation tag (as Hugging Face `datasets` decodes images)."""
    try:
        with Image.open(fp) as img:
            img.load()             # decode now: truncated files fail here, not later in a worker
            return to_rgb(ImageOps.exif_transpose(img) if orient else img)
    except UnidentifiedImageError:
        raise BadImage("not a readable image") from None
    except Image.DecompressionBombError:
        raise BadImage("too large (PIL decompression-bomb limit)") from None
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, struct.error...: all mean corrupt
        msg = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
        raise BadImage("truncated" if "truncated" in msg.lower() else f"corrupt ({msg})") from None


# ---------------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------------

class FileSource:
    """Images on disk: a list of paths with labels and captions. ``orient``: apply the EXIF orientation (a folder
    of the user's photos, like the same photos through `datasets`); ImageNet and COCO keep the stored pixels, as
    the official pipelines decode them."""

    def __init__(self, kind: str, root: Path, paths: list[Path], labels: list[int] | None = None,
                 captions: list[tuple[str, ...]] | None = None, class_names: list[str] | None = None,
                 orient: bool = False):
        self.kind, self.root, self.paths, self.orient = kind, Path(root), paths, orient
        self.labels, self.captions, self.class_names = labels, captions, class_names
        self.location = str(Path(root).resolve())   # absolute: a rerun from another directory still matches

    @property
    def conditioning(self) -> str:
        return "text" if self.captions is not None else "class" if self.labels is not None else "none"

    def __len__(self) -> int:
        return len(self.paths)

    def record(self, i: int) -> Record:
        p = self.paths[i]
        key = str(p.relative_to(self.root)) if p.is_relative_to(self.root) else str(p)
        return Record(key, self.labels[i] if self.labels is not None else -1,
                      self.captions[i] if self.captions is not None else ())

    def load(self, i: int):
        if not self.paths[i].is_file():
            raise BadImage("missing file")
        return open_image(self.paths[i], orient=self.orient)


class HFSource:
    """Rows of a Hugging Face `datasets` split with an image column and a label or caption column."""

    def __init__(self, kind: str, name: str, ds, label_col: str | None, caption_col: str | None):
        self.kind, self.location, self.ds = kind, f"hf:{name}", ds
        self.label_col, self.caption_col = label_col, caption_col
        self.image_col = next((c for c in ("image", "img", "jpg", "png") if c in ds.column_names), None)
        if self.image_col is None:
            raise UvitError(f"hf:{name} has no image column (columns: {', '.join(ds.column_names)})")
        feat = ds.features.get(label_col) if label_col else None
        self.class_names = list(feat.names) if feat is not None and hasattr(feat, "names") else None
        if label_col and self.class_names is None:
            n = int(max(ds[label_col])) + 1 if len(ds) else 0
            self.class_names = [str(c) for c in range(n)]
        # labels/captions read once (cheap columns) so that record() never decodes images
        self._labels = list(ds[label_col]) if label_col else None
        self._captions = [_caption_list(c) for c in ds[caption_col]] if caption_col else None

    @property
    def conditioning(self) -> str:
        return "text" if self.caption_col else "class" if self.label_col else "none"

    def __len__(self) -> int:
        return len(self.ds)

    def record(self, i: int) -> Record:
        return Record(f"hf:{i}", int(self._labels[i]) if self._labels is not None else -1,
                      self._captions[i] if self._captions is not None else ())

    def load(self, i: int):
        try:
            img = self.ds[int(i)][self.image_col]
        except Exception as e:  # noqa: BLE001 - the datasets image decoder raises many kinds
            raise BadImage(f"corrupt ({type(e).__name__})") from None
        if isinstance(img, dict) and img.get("bytes") is not None:
            return open_image(io.BytesIO(img["bytes"]))
        try:
            img.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise BadImage("truncated" if "truncated" in str(e).lower() else "corrupt") from None
        return to_rgb(img)


def _caption_list(value) -> tuple[str, ...]:
    """Captions from a str, a list of str, or a list of {"raw": ...} dicts (COCO-style HF datasets)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, dict):
        value = value.get("raw", value.get("text", []))
        return _caption_list(value)
    out = []
    for v in value:
        out.extend(_caption_list(v))
    return tuple(c.strip() for c in out if c and c.strip())


def _image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def is_hf_disk_dir(path: str | Path) -> bool:
    """A directory written by `datasets`' ``save_to_disk``."""
    p = Path(path).expanduser()
    return p.is_dir() and any((p / m).exists() for m in HF_DISK_MARKERS)


def _open_hf(kind: str, name: str, split: str, allow_download: bool):
    """A `datasets` split: a hub name (cache only unless allowed), a local data directory, or a save_to_disk dir."""
    import datasets  # deferred: `datasets` costs about a second to import and only HF sources need it

    p = Path(name).expanduser()
    try:
        if is_hf_disk_dir(p):
            ds = datasets.load_from_disk(str(p))
        else:
            cfg = datasets.DownloadConfig(local_files_only=not allow_download)
            with offline_unless(allow_download):
                ds = datasets.load_dataset(name, download_config=cfg)
    except Exception as e:  # noqa: BLE001
        hint = "" if allow_download else " (not in the local cache; allow the download with --allow-download)"
        raise UvitError(f"could not open the data set hf:{name}{hint}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
    if isinstance(ds, (datasets.DatasetDict, dict)):
        names = list(ds.keys())
        pick = split if split in ds else {"val": "validation"}.get(split)
        if pick not in ds:
            raise UvitError(f"hf:{name} has no split {split!r}; it has {', '.join(names)}")
        ds = ds[pick]
    return ds


def open_imagenet(source: str, split: str = "train", allow_download: bool = False):
    """ImageNet from ``hf:NAME`` or a local ``<root>/<split>/<wnid>/*.JPEG`` tree; labels = sorted wnids."""
    if source.startswith("hf:"):
        ds = _open_hf("imagenet", source[3:], split, allow_download)
        label = next((c for c in LABEL_KEYS if c in ds.column_names), None)
        if label is None:
            raise UvitError(f"{source} has no label column (columns: {', '.join(ds.column_names)})")
        return HFSource("imagenet", source[3:], ds, label, None)
    root = Path(source).expanduser()
    if not root.is_dir():
        raise UvitError(f"ImageNet folder {root} does not exist; pass --source /path/to/imagenet (containing "
                        f"{split}/<wnid>/*.JPEG) or --source hf:ILSVRC/imagenet-1k")
    split_dir = root / split if (root / split).is_dir() else root
    wnids = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not wnids:
        raise UvitError(f"{split_dir} has no class folders; expected {split}/<wnid>/*.JPEG (e.g. train/n01440764/...)")
    if len(wnids) != 1000:
        log.warning("%s has %d class folders, not 1000: labels follow the sorted folder names and will not match "
                    "the standard ImageNet class ids", split_dir, len(wnids))
    paths, labels = [], []
    for c, wnid in enumerate(wnids):
        files = _image_files(split_dir / wnid)
        paths += files
        labels += [c] * len(files)
    if not paths:
        raise UvitError(f"{split_dir} holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return FileSource("imagenet", split_dir, paths, labels=labels, class_names=wnids)


def open_coco(source: str, split: str = "train", allow_download: bool = False):
    """MS-COCO 2014 from ``hf:NAME`` or ``<root>/{split}2014/`` + ``<root>/annotations/captions_{split}2014.json``.

    Images are ordered by image id and keep every caption in annotation-file order (as the official cache).
    """
    if source.startswith("hf:"):
        ds = _open_hf("coco", source[3:], split, allow_download)
        col = next((c for c in CAPTION_KEYS if c in ds.column_names), None)
        if col is None:
            raise UvitError(f"{source} has no caption column ({'/'.join(CAPTION_KEYS)}); columns: "
                            f"{', '.join(ds.column_names)}")
        return HFSource("coco", source[3:], ds, None, col)
    root = Path(source).expanduser()
    ann = root / "annotations" / f"captions_{split}2014.json"
    img_dir = root / f"{split}2014"
    if not ann.is_file():
        raise UvitError(f"COCO annotation file {ann} is missing; download annotations_trainval2014.zip from "
                        f"cocodataset.org and unpack it under {root}")
    if not img_dir.is_dir():
        raise UvitError(f"COCO image folder {img_dir} is missing; unpack {split}2014.zip under {root}")
    try:
        data = json.loads(ann.read_text())
        images = sorted(data["images"], key=lambda im: im["id"])
        caps: dict[int, list[str]] = {}
        for a in data["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"].strip())
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UvitError(f"{ann} is not a COCO captions file ({type(e).__name__}: {e})") from None
    if not images:
        raise UvitError(f"{ann} lists no images")
    paths = [img_dir / im["file_name"] for im in images]
    captions = [tuple(caps.get(im["id"], ())) for im in images]
    return FileSource("coco", img_dir, paths, captions=captions)


def _read_caption_jsonl(path: Path, root: Path) -> dict[str, tuple[str, ...]]:
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = row.get("file_name") or row.get("file") or row.get("image")
            value = next(row[k] for k in CAPTION_KEYS if k in row)
        except (json.JSONDecodeError, StopIteration, AttributeError):
            raise UvitError(f"{path}:{n}: expected a JSON object with file_name and caption/captions/text") from None
        out[str(Path(name))] = _caption_list(value)
    return out


def open_folder(source: str, condition: str = "auto", captions: str | None = None, split: str = "train",
                allow_download: bool = False):
    """Any image tree: class labels from first-level sub-folder names, captions from ``captions.jsonl`` /
    ``metadata.jsonl`` (or ``captions``) or sidecar ``.txt`` files (one caption per line); else unconditional."""
    if source.startswith("hf:") or is_hf_disk_dir(source):
        name = source.removeprefix("hf:")
        ds = _open_hf("folder", name, split, allow_download)
        cap = next((c for c in CAPTION_KEYS if c in ds.column_names), None) if condition in ("auto", "text") else None
        lab = next((c for c in LABEL_KEYS if c in ds.column_names), None) \
            if condition in ("auto", "class") and not cap else None
        if condition == "class" and lab is None:
            raise UvitError(f"{source} has no label column ({'/'.join(LABEL_KEYS)}); columns: "
                            f"{', '.join(ds.column_names)}")
        return HFSource("folder", name, ds, lab, cap)
    root = Path(source).expanduser()
    if not root.is_dir():
        raise UvitError(f"image folder {root} does not exist; pass --source DIR")
    paths = _image_files(root)
    if not paths:
        raise UvitError(f"{root} holds no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))} files)")
    caps = None
    if condition in ("auto", "text"):
        jsonl = Path(captions) if captions else next((root / n for n in CAPTION_FILES if (root / n).is_file()), None)
        if captions and not jsonl.is_file():
            raise UvitError(f"caption file {jsonl} does not exist")
        table = _read_caption_jsonl(jsonl, root) if jsonl else {}
        side = {p: p.with_suffix(".txt") for p in paths}
        if table or any(t.is_file() for t in side.values()):
            caps = []
            for p in paths:
                c = table.get(str(p.relative_to(root)), ())
                if not c and side[p].is_file():
                    c = tuple(s.strip() for s in side[p].read_text().splitlines() if s.strip())
                caps.append(c)
        elif condition == "text":
            raise UvitError(f"{root}: no captions found; add captions.jsonl ({{\"file_name\": ..., \"text\": ...}} "
                            "per line) or a .txt file next to each image")
    labels = names = None
    if caps is None and condition in ("auto", "class"):
        top = [p.relative_to(root).parts for p in paths]
        if all(len(t) > 1 for t in top):
            names = sorted({t[0] for t in top})
            labels = [names.index(t[0]) for t in top]
        elif condition == "class":
            raise UvitError(f"{root}: class labels come from sub-folders, but some images sit directly in {root}")
    return FileSource("folder", root, paths, labels=labels, captions=caps, class_names=names, orient=True)


def open_source(kind: str, source: str, split: str = "train", allow_download: bool = False, **folder_kw):
    """Dispatch on the data set kind: imagenet, coco or folder."""
    if kind == "imagenet":
        return open_imagenet(source, split, allow_download)
    if kind == "coco":
        return open_coco(source, split, allow_download)
    if kind == "folder":
        return open_folder(source, split=split, allow_download=allow_download, **folder_kw)
    raise UvitError(f"unknown data set {kind!r}; use imagenet, coco or folder")


class CroppedImages:
    """A map-style dataset for DataLoader workers: index -> dict(index, image uint8 (3,H,W) or None, note)."""

    def __init__(self, source, crop: str, size: int):
        self.source, self.crop, self.size = source, crop, size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        try:
            img, converted = self.source.load(i)
            arr = crop_image(img, self.crop, self.size)
        except BadImage as e:
            return {"index": i, "image": None, "note": f"skipped:{e}"}
        # CHW copy in numpy: a torch permute+copy of a small image costs ~20 ms in a busy multi-threaded process
        return {"index": i, "image": torch.from_numpy(np.array(arr.transpose(2, 0, 1), order="C")),
                "note": f"converted:{converted}" if converted else ""}


def collate(items: list[dict]) -> dict:
    """Stack the good images; keep every index and note (bad ones have image None)."""
    good = [it["image"] for it in items if it["image"] is not None]
    return {"index": [it["index"] for it in items], "note": [it["note"] for it in items],
            "ok": [it["image"] is not None for it in items],
            "images": torch.stack(good) if good else None}
