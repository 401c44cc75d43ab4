"""Image sources for scoring: an image folder, an ADM-style ``.npz`` (uint8 NHWC ``arr_0``) or in-memory batches.

Every source yields uint8 (B, H, W, C) numpy batches and is validated up front: unreadable or mixed-size files,
an empty folder, float/NaN/inf arrays, NCHW layouts and wrong channel counts are UvitErrors that say what to
fix. ``.npz`` arrays are streamed from the zip member, so a 50K-sample file is never loaded whole.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..errors import UvitError
from ..files import IMAGE_SUFFIXES

log = logging.getLogger(__name__)



class ImageSource:
    """Base class: ``len``, ``shape`` (H, W, C), ``labels`` (or None), ``batches()`` and a content hash."""

    kind = "images"
    name = ""
    shape: tuple[int, int, int] = (0, 0, 0)
    labels: Optional[np.ndarray] = None

    def __len__(self) -> int:
        raise NotImplementedError

    def batches(self, batch_size: int, limit: int | None = None, start: int = 0) -> Iterator[np.ndarray]:
        """uint8 batches of images start..limit-1 (limit: an index, default the end)."""
        raise NotImplementedError

    def sha256(self) -> str:
        raise NotImplementedError

    def card(self) -> dict:
        h, w, c = self.shape
        return {"source": self.name, "kind": self.kind, "sha256": self.sha256(), "count": len(self),
                "resolution": f"{h}x{w}", "channels": c}


# ---------------------------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------------------------

class FolderSource(ImageSource):
    """Image files directly inside a folder (as pytorch-fid reads them), else in its sub-folders; sorted by path.

    Images are converted with PIL to RGB (``channels=3``, as pytorch-fid does) or to gray (``channels=1``).
    """

    kind = "folder"

    def __init__(self, path: str | Path, channels: int = 3):
        self.path = Path(path)
        self.name = str(self.path)
        if not self.path.is_dir():
            raise UvitError(f"{self.path} is not a folder")
        files = sorted(p for p in self.path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            files = sorted(p for p in self.path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UvitError(f"{self.path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); point at the "
                            "folder of sample PNGs, or at an .npz with arr_0")
        self.files = files
        self.channels = channels
        first = self._read(files[0])
        self.shape = first.shape
        self._hash = None

    def _read(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                img = np.asarray(im.convert("RGB" if self.channels == 3 else "L"))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise UvitError(f"cannot read image {path} ({type(e).__name__}: {e}); remove or re-save it") from None
        return img if img.ndim == 3 else img[..., None]

    def __len__(self) -> int:
        return len(self.files)

    def batches(self, batch_size: int, limit: int | None = None, start: int = 0) -> Iterator[np.ndarray]:
        files = (self.files[:limit] if limit else self.files)[start:]

        def load(chunk):
            imgs = [self._read(p) for p in chunk]
            for p, img in zip(chunk, imgs):
                if img.shape != self.shape:
                    raise UvitError(f"{p} is {img.shape[1]}x{img.shape[0]} but {self.files[0].name} is "
                                    f"{self.shape[1]}x{self.shape[0]}: all images of a set must share one "
                                    "resolution; resize them first (FID compares 299x299 resizes of each set)")
            return np.stack(imgs)

        chunks = (files[i:i + batch_size] for i in range(0, len(files), batch_size))
        yield from prefetch(map(load, chunks))

    def sha256(self) -> str:
        if self._hash is None:
            h = hashlib.sha256()
            for p in self.files:
                h.update(str(p.relative_to(self.path)).encode() + b"\0")
                with open(p, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
            self._hash = h.hexdigest()
        return self._hash


# ---------------------------------------------------------------------------------------------------------------------
# .npz (ADM sample batches and reference batches)
# ---------------------------------------------------------------------------------------------------------------------

def npz_keys(path: str | Path) -> list[str]:
    """The array names in an .npz (without loading any array)."""
    try:
        with zipfile.ZipFile(path) as z:
            return [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as e:
        raise UvitError(f"{path} is not a readable .npz ({e}); it may be truncated") from None


def _npy_header(f) -> tuple[tuple, np.dtype, bool]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


class NpzSource(ImageSource):
    """``arr_0`` of an .npz: uint8 (N, H, W, C) images in 0..255, streamed; ``arr_1`` (if present) are labels."""

    kind = "npz"

    def __init__(self, path: str | Path, key: str = "arr_0", channels: int = 3):
        self.path = Path(path)
        self.name = str(self.path)
        self.key = key
        if not self.path.is_file():
            raise UvitError(f"{self.path} does not exist")
        keys = npz_keys(self.path)
        if key not in keys:
            raise UvitError(f"{self.path} has no {key!r} array (it has {', '.join(keys) or 'none'}); an ADM-style "
                            "sample file stores uint8 NHWC images as arr_0")
        with self._open() as f:
            shape, fortran, dtype = _npy_header(f)
        self._offset_shape, self.dtype, self.fortran = shape, np.dtype(dtype), fortran
        self._validate(shape, channels)
        self.labels = None
        if "arr_1" in keys and key == "arr_0":
            with np.load(self.path, allow_pickle=False) as z:
                lab = z["arr_1"]
            if lab.ndim == 1 and len(lab) == len(self):
                self.labels = lab.astype(np.int64)
        self._hash = None

    @contextmanager
    def _open(self):
        with zipfile.ZipFile(self.path) as z, z.open(f"{self.key}.npy") as f:
            yield f

    def _validate(self, shape: tuple, channels: int) -> None:
        where = f"{self.path} {self.key}"
        if self.fortran:
            raise UvitError(f"{where} is stored in Fortran order; save it with np.savez(path, np.ascontiguousarray(x))")
        if len(shape) == 3:
            shape = (*shape, 1)
        if len(shape) != 4:
            raise UvitError(f"{where} has shape {shape}; expected uint8 images (N, H, W, C)")
        n, h, w, c = shape
        if c not in (1, 3) and shape[1] in (1, 3):
            raise UvitError(f"{where} has shape {shape}, which looks channels-first (NCHW); store NHWC: "
                            "x.transpose(0, 2, 3, 1)")
        if c != channels:
            want = "RGB (N, H, W, 3)" if channels == 3 else "gray (N, H, W) or (N, H, W, 1)"
            raise UvitError(f"{where} has {c} channels; this metric needs {want} images")
        if self.dtype.kind == "f":
            self._check_finite()
            raise UvitError(f"{where} is {self.dtype} but must be uint8 0..255 (the ADM format): a float array is "
                            "ambiguous ([0,1], [-1,1] or [0,255]); quantise as uint8(clip((x + 1) * 127.5 + 0.5, 0, 255))")
        if self.dtype != np.uint8:
            raise UvitError(f"{where} is {self.dtype}; expected uint8 images in 0..255")
        if n == 0:
            raise UvitError(f"{where} holds no images")
        self.shape = (h, w, c)
        self._n = n

    def _check_finite(self) -> None:
        for i, b in enumerate(self._raw_batches(256)):
            bad = ~np.isfinite(b)
            if bad.any():
                first = i * 256 + int(np.argwhere(bad.reshape(len(b), -1).any(axis=1))[0, 0])
                raise UvitError(f"{self.path} {self.key} contains NaN or inf values (first at sample {first}): the "
                                "sampler diverged; regenerate those samples (check precision and guidance scale)")

    def _raw_batches(self, batch_size: int, limit: int | None = None, first: int = 0) -> Iterator[np.ndarray]:
        shape = self._offset_shape
        per = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        n = shape[0] if limit is None else min(limit, shape[0])
        row = per * self.dtype.itemsize
        with self._open_at(first * row) as f:
            for start in range(first, n, batch_size):
                m = min(batch_size, n - start)
                buf = f.read(m * row)
                if len(buf) != m * row:
                    raise UvitError(f"{self.path} ends early (sample {start}); the file is truncated")
                yield np.frombuffer(buf, dtype=self.dtype).reshape(m, *shape[1:])

    @contextmanager
    def _open_at(self, offset: int):
        """The array's bytes from ``offset`` on: an uncompressed member (what np.savez and the sample store
        write) is read straight from the file at its data offset, so a rank scoring the last part of a large file
        does not read through the rest; a compressed one is read through."""
        with zipfile.ZipFile(self.path) as z:
            info = z.getinfo(f"{self.key}.npy")
        if info.compress_type != zipfile.ZIP_STORED or not offset:
            with self._open() as f:
                _npy_header(f)
                while offset:                        # read through (compressed members cannot seek)
                    offset -= len(f.read(min(offset, 1 << 24)))
                yield f
            return
        with open(self.path, "rb") as raw:
            raw.seek(info.header_offset)
            local = raw.read(30)                     # the local file header: name and extra field lengths at 26, 28
            name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            raw.seek(info.header_offset + 30 + name_len + extra_len)
            _npy_header(raw)
            raw.seek(offset, 1)
            yield raw

    def __len__(self) -> int:
        return self._n

    def batches(self, batch_size: int, limit: int | None = None, start: int = 0) -> Iterator[np.ndarray]:
        for b in prefetch(self._raw_batches(batch_size, limit, start)):
            yield b if b.ndim == 4 else b[..., None]

    def sha256(self) -> str:
        if self._hash is None:
            h = hashlib.sha256()
            with open(self.path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            self._hash = h.hexdigest()
        return self._hash


# ---------------------------------------------------------------------------------------------------------------------
# In-memory arrays and batch iterators
# ---------------------------------------------------------------------------------------------------------------------

def check_uint8_batch(batch, where: str = "samples") -> np.ndarray:
    """A uint8 (B, H, W, C) numpy batch, or a UvitError for float/NaN/inf data or a wrong layout."""
    if hasattr(batch, "detach"):
        batch = batch.detach().cpu().numpy()
    batch = np.asarray(batch)
    if batch.dtype != np.uint8:
        if batch.dtype.kind == "f" and not np.isfinite(batch).all():
            raise UvitError(f"{where} contain NaN or inf values: the sampler diverged; regenerate them")
        raise UvitError(f"{where} are {batch.dtype}; expected uint8 images in 0..255 (N, H, W, C)")
    if batch.ndim == 3:
        batch = batch[..., None]
    if batch.ndim != 4:
        raise UvitError(f"{where} have shape {batch.shape}; expected (N, H, W, C)")
    return batch


class ArraySource(ImageSource):
    """In-memory uint8 images (N, H, W, C) such as ``generate()`` returns, with optional labels."""

    kind = "array"

    def __init__(self, images, labels=None, name: str = "in-memory samples"):
        self.images = check_uint8_batch(images, name)
        self.shape = self.images.shape[1:]
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int, limit: int | None = None, start: int = 0) -> Iterator[np.ndarray]:
        n = len(self) if limit is None else min(limit, len(self))
        for i in range(start, n, batch_size):
            yield self.images[i:min(i + batch_size, n)]

    def sha256(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.images).tobytes()).hexdigest()


def open_source(path: str | Path, channels: int = 3) -> ImageSource:
    """An image folder or an .npz, by what the path is."""
    p = Path(path)
    if p.is_dir():
        return FolderSource(p, channels=channels)
    if p.suffix == ".npz":
        return NpzSource(p, channels=channels)
    if not p.exists():
        raise UvitError(f"{p} does not exist")
    raise UvitError(f"{p} is neither an image folder nor an .npz; pass a folder of PNGs or an ADM-style .npz")


def prefetch(it: Iterator, depth: int = 2) -> Iterator:
    """Run ``it`` in a background thread (image decoding overlaps the network); exceptions re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in it:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)
        q.put(done)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():  # drain so the worker can finish
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
