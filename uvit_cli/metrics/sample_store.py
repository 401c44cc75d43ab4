"""A resumable sample store: N generated images written as atomic chunks, assembled into one ADM-style .npz.

``<out>.parts/`` holds ``manifest.json`` (the sampling protocol) and ``chunk_<start>_<count>.npz`` files
(metrics/parts.py), each written atomically, so an interrupted run loses at most the chunks in progress and a
rerun continues. Under torchrun every rank draws its share of the missing chunks and rank 0 assembles. The final
``out`` (``arr_0`` uint8 NHWC images, ``arr_1`` labels, ``uvit_samples_meta`` JSON) is streamed chunk by chunk
into the zip with fixed member timestamps, and appears, atomically, only when every sample exists. Sample i
depends only on its index (per-sample seeds), so chunks made by different runs and ranks of the same protocol fit
together and the file's bytes do not depend on how many processes drew it.
"""

from __future__ import annotations

import json
import logging
import math
import zipfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .. import distributed
from ..errors import UvitError
from ..files import atomic_path, write_json
from .parts import Parts, Tracker, make_parts

log = logging.getLogger(__name__)

META_KEY = "uvit_samples_meta"
ZIP_TIME = (1980, 1, 1, 0, 0, 0)   # zip member timestamp (the format's earliest)


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def read_samples_meta(path: str | Path) -> dict:
    """The protocol stored in a finished sample .npz ({} for files written elsewhere)."""
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z[META_KEY])) if META_KEY in z.files else {}


def _write_npy_member(zf: zipfile.ZipFile, name: str, shape: tuple, dtype, chunks) -> None:
    """Stream an .npy member: header, then the raw C-order bytes of each chunk."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_TIME)   # a fixed time: the same samples, the same bytes
    info.compress_type = zipfile.ZIP_STORED
    with zf.open(info, "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, header)
        for c in chunks:
            f.write(np.ascontiguousarray(c, dtype=dtype).tobytes())


def default_chunk(n: int) -> int:
    """Samples per chunk for n samples: about 128 chunks (balanced over up to 128 ranks, fine-grained resume),
    a multiple of 16, between 16 and 1024. It depends only on n, so a resume with another world size fits."""
    return int(min(1024, max(16, 16 * math.ceil(n / 128 / 16))))


def sample_to_npz(out: str | Path, n: int, make: Callable[[int, int], tuple], *, meta: dict,
                  chunk: Optional[int] = None, progress: Optional[Callable[[int, int], None]] = None,
                  tracker: Optional[Tracker] = None, all_ranks: bool = False,
                  replace: bool = False) -> tuple[Path, list[int]]:
    """Make samples 0..n-1 with ``make(start, stop) -> (uint8 (B, H, W, C) images, labels or None)`` into ``out``;
    returns (out, the chunk starts drawn in this job).

    ``meta`` identifies the protocol (checkpoint hash, recipe, guidance, sampler, seeds...); a finished file or
    partial chunks made under another protocol are a UvitError, never silently mixed (``replace``: a finished
    file of another protocol is replaced instead, as `uvit sample --npz` overwrites its output). ``all_ranks``:
    every rank of a torchrun job calls this and draws its share of the chunks; rank 0 assembles the file.
    """
    out = Path(out)
    meta = {**meta, "count": n}
    chunk = int(chunk or default_chunk(n))
    parts = Parts(parts_dir(out), n, chunk)
    manifest = {"meta": {k: v for k, v in meta.items() if k != "count"}, "chunk": chunk}

    def prepare() -> bool:
        """True when the finished file of this protocol is reused; else check or write the manifest."""
        if out.exists():
            old = read_samples_meta(out)
            if old == meta:
                log.info("reusing the finished samples %s", out)
                return True
            if not replace:
                raise UvitError(f"{out} exists but was made with another protocol ({_diff(old, meta)}); delete it "
                                "or pick another --samples-out")
            log.info("replacing %s (made with another protocol: %s)", out, _diff(old, meta))
        mpath = parts.root / "manifest.json"
        if mpath.exists():
            old = json.loads(mpath.read_text())
            if old != manifest:
                what = _diff(old["meta"], manifest["meta"]) if old.get("chunk") == chunk else \
                    f"chunks of {old.get('chunk')} samples, now {chunk}"
                raise UvitError(f"{parts.root} holds partial samples of another protocol ({what}); delete "
                                f"{parts.root} or pick another output")
        else:
            write_json(mpath, manifest)
        return False

    def make_chunk(start: int, stop: int) -> dict:
        images, labels = make(start, stop)
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != stop - start:
            raise UvitError(f"the sampler returned {images.dtype} {images.shape} for samples {start}..{stop}; "
                            "expected uint8 (B, H, W, C)")
        arrays = {"arr_0": images}
        if labels is not None:
            arrays["arr_1"] = np.asarray(labels, dtype=np.int64)
        return arrays

    if progress is not None and tracker is None:
        tracker = Tracker(progress)
    reused = distributed.first_error(prepare) if all_ranks else prepare()
    if reused:
        if tracker is not None and tracker.progress is not None:
            tracker.progress(n, n)
        return out, []
    made = make_parts(parts, make_chunk, all_ranks=all_ranks, tracker=tracker, what="sampling")
    if not all_ranks or distributed.is_main():
        _assemble(out, parts, meta)
        parts.remove()
    if all_ranks:
        distributed.barrier("assembling the samples")
    return out, made


def read_chunks(parts: Parts, key: str):
    """One array of every chunk, in index order (for streaming into the final file)."""
    for s in parts.starts:
        yield parts.read(s).get(key)


def _assemble(out: Path, parts: Parts, meta: dict) -> None:
    first = parts.read(parts.starts[0])
    n = parts.n
    with atomic_path(out) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            _write_npy_member(zf, "arr_0", (n, *first["arr_0"].shape[1:]), np.uint8, read_chunks(parts, "arr_0"))
            if "arr_1" in first:
                _write_npy_member(zf, "arr_1", (n,), np.int64, read_chunks(parts, "arr_1"))
            text = json.dumps(meta, sort_keys=True)
            _write_npy_member(zf, META_KEY, (), np.dtype(f"<U{len(text)}"), [np.asarray(text)])


def _diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:4]) or "unknown difference"
