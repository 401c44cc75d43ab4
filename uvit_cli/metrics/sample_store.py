"""A resumable sample store: N generated images written as atomic chunks, assembled into one ADM-style .npz.

``<out>.parts/`` holds ``manifest.json`` (the sampling protocol) and ``chunk_<start>.npz`` files, each written
atomically, so an interrupted run loses at most the chunk in progress and a rerun continues. The final ``out``
(``arr_0`` uint8 NHWC images, ``arr_1`` labels, ``uvit_samples_meta`` JSON) is streamed chunk by chunk into the
zip and appears, atomically, only when every sample exists. Sample i depends only on its index (per-sample
seeds), so chunks made by different runs of the same protocol fit together.
"""

from __future__ import annotations

import json
import logging
import shutil
import zipfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..files import atomic_path
from ..errors import UvitError

log = logging.getLogger(__name__)

META_KEY = "uvit_samples_meta"


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def read_samples_meta(path: str | Path) -> dict:
    """The protocol stored in a finished sample .npz ({} for files written elsewhere)."""
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z[META_KEY])) if META_KEY in z.files else {}


def _write_npy_member(zf: zipfile.ZipFile, name: str, shape: tuple, dtype, chunks) -> None:
    """Stream an .npy member: header, then the raw C-order bytes of each chunk."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, header)
        for c in chunks:
            f.write(np.ascontiguousarray(c, dtype=dtype).tobytes())


def sample_to_npz(out: str | Path, n: int, make: Callable[[int, int], tuple], *, meta: dict, chunk: int = 1000,
                  progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """Make samples 0..n-1 with ``make(start, stop) -> (uint8 (B, H, W, C) images, labels or None)`` into ``out``.

    ``meta`` identifies the protocol (checkpoint hash, recipe, guidance, sampler, seed...); a finished file or
    partial chunks made under another protocol are a UvitError, never silently mixed.
    """
    out = Path(out)
    meta = {**meta, "count": n}
    if out.exists():
        old = read_samples_meta(out)
        if old == meta:
            log.info("reusing the finished samples %s", out)
            return out
        raise UvitError(f"{out} exists but was made with another protocol ({_diff(old, meta)}); delete it or pick "
                        "another --samples-out")
    parts = parts_dir(out)
    manifest = {"meta": {k: v for k, v in meta.items() if k != "count"}, "chunk": chunk}
    mpath = parts / "manifest.json"
    if mpath.exists():
        old = json.loads(mpath.read_text())
        if old != manifest:
            raise UvitError(f"{parts} holds partial samples of another protocol ({_diff(old['meta'], manifest['meta'])})"
                            f"; delete {parts} or pick another --samples-out")
    else:
        parts.mkdir(parents=True, exist_ok=True)
        with atomic_path(mpath) as tmp:
            tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    starts = list(range(0, n, chunk))
    done = sum(min(chunk, n - s) for s in starts if _find_chunk(parts, s, min(chunk, n - s)))
    if done:
        log.info("resuming: %d of %d samples already in %s", done, n, parts)
    if progress:
        progress(done, n)
    for s in starts:
        if _find_chunk(parts, s, min(chunk, n - s)):
            continue
        images, labels = make(s, min(s + chunk, n))
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != min(chunk, n - s):
            raise UvitError(f"the sampler returned {images.dtype} {images.shape} for samples {s}..{min(s + chunk, n)}; "
                            "expected uint8 (B, H, W, C)")
        arrays = {"arr_0": images}
        if labels is not None:
            arrays["arr_1"] = np.asarray(labels, dtype=np.int64)
        with atomic_path(parts / f"chunk_{s:09d}_{len(images)}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        done += len(images)
        if progress:
            progress(done, n)
    _assemble(out, parts, starts, chunk, n, meta)
    shutil.rmtree(parts, ignore_errors=True)
    return out


def _find_chunk(parts: Path, start: int, need: int) -> Optional[Path]:
    """A finished chunk that starts at ``start`` and holds at least ``need`` samples (names carry the count, so a
    chunk from a run with another n is reused when it is long enough)."""
    for p in sorted(parts.glob(f"chunk_{start:09d}_*.npz")):
        try:
            if int(p.stem.rsplit("_", 1)[1]) >= need:
                return p
        except ValueError:
            continue
    return None


def _assemble(out: Path, parts: Path, starts: list, chunk: int, n: int, meta: dict) -> None:
    def load(s, key):
        want = min(chunk, n - s)
        with np.load(_find_chunk(parts, s, want), allow_pickle=False) as z:
            a = z[key] if key in z.files else None
        return None if a is None else a[:want]

    first = load(starts[0], "arr_0")
    has_labels = load(starts[0], "arr_1") is not None
    with atomic_path(out) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            _write_npy_member(zf, "arr_0", (n, *first.shape[1:]), np.uint8, (load(s, "arr_0") for s in starts))
            if has_labels:
                _write_npy_member(zf, "arr_1", (n,), np.int64, (load(s, "arr_1") for s in starts))
            _write_npy_member(zf, META_KEY, (), np.dtype(f"<U{len(json.dumps(meta))}"),
                              [np.asarray(json.dumps(meta))])


def _diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4]) or "unknown difference"
