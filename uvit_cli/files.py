"""File primitives every writer and reader uses: atomic writes, JSON, SHA-256, safetensors with deterministic
bytes, and the one ``weights_only`` state-dict reader.

A leaf module: it imports nothing from the package but the error type, so any module may use it. It is also
torch-free at import (torch and safetensors load inside the tensor functions), so the recipe and run-directory
layer, and with it `uvit --help`, never pay torch's 1.5 s import.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import UvitError

# Image files every reader accepts (encode sources, training folders, scoring folders); pytorch-fid's list plus gif.
IMAGE_SUFFIXES = frozenset({".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"})


# ---------------------------------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------------------------------

@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path``; on success fsync it and rename it over ``path``.

    A crash leaves either the old file or the new one, never a partial file under the final name. The file gets
    the permissions of a normal write under the user's umask (mkstemp alone would make it 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def prepare_output(path: str | Path, option: str, *, directory: bool = False) -> Path:
    """Check, before any work, that an output can be written: refuse a folder where a file goes (or a file where a
    folder goes, or a path under a regular file), and probe that the nearest existing folder is writable. Nothing
    is created, so a command that fails later leaves no trace. ``option`` names the flag or key in the message."""
    p = Path(path).expanduser()
    if directory and p.exists() and not p.is_dir():
        raise UvitError(f"{option} {p} is a file; pass a folder (or a new path) for this output")
    if not directory and p.is_dir():
        raise UvitError(f"{option} {p} is a folder; pass a file path such as {p / ('out' + (p.suffix or ''))}")
    above = next(a for a in (p if directory else p.parent, *p.parents) if a.exists() or a == Path(a.anchor))
    if not above.is_dir():
        raise UvitError(f"{option} {p}: {above} is a file, not a folder; pick another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".uvit-write-probe-", dir=above)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UvitError(f"{option} {p}: cannot write in {above} ({e.strerror or e}); pick a writable place") from None
    return p


def cache_dir() -> Path:
    """The project's cache (the digits classifier, reference features, built-in text towers): $UVIT_CACHE, else
    ~/.cache/uvit."""
    return Path(os.environ.get("UVIT_CACHE") or Path.home() / ".cache" / "uvit").expanduser()


def write_text(path: str | Path, text: str) -> Path:
    """``text`` written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, data, indent: int | None = 1) -> Path:
    """JSON written atomically with sorted keys, so the same data always gives the same bytes."""
    return write_text(path, json.dumps(data, indent=indent, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------------------------------

def safetensors_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    """A safetensors file's bytes with the metadata keys sorted.

    safetensors writes ``__metadata__`` from a hash map, so its key order (and the file's hash) changes from run to
    run; the tensor part is already deterministic. We rebuild the header with sorted metadata, keeping the 8-byte
    alignment the format asks for, so saving the same weights twice gives the same bytes.
    """
    from safetensors.torch import save

    raw = save({k: v.detach().contiguous() for k, v in tensors.items()})
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    if metadata:
        header = {"__metadata__": {str(k): str(metadata[k]) for k in sorted(metadata)}, **header}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + memoryview(raw)[8 + n:]


def write_safetensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> Path:
    """Tensors (and string metadata) written atomically as safetensors, with deterministic bytes."""
    data = safetensors_bytes(tensors, metadata)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def read_safetensors(path: str | Path) -> dict:
    """The tensors of a safetensors file; a truncated or foreign file is a UvitError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UvitError(f"{path} is not a readable safetensors file ({e}); it may be truncated") from None


# ---------------------------------------------------------------------------------------------------------------------
# State dicts from files other projects wrote
# ---------------------------------------------------------------------------------------------------------------------

NESTED_KEYS = ("ema", "nnet_ema", "model", "state_dict")  # wrappers of a state dict in a checkpoint, EMA first


def read_state_dict(path: str | Path, hint: str = "only plain tensor state dicts are loaded") -> dict:
    """A state dict of tensors from ``.safetensors`` or a ``.pth``/``.pt``/``.ckpt``/``.bin`` read with
    ``torch.load(weights_only=True)``: never an arbitrary pickle. A checkpoint that nests the state dict under one of
    ``NESTED_KEYS`` is unwrapped. ``hint`` ends the error message (what the caller expected)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UvitError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means "not a plain tensor state dict"
        first = str(e).splitlines()[0][:160] if str(e) else ""
        raise UvitError(f"{path} could not be read as a state dict with weights_only=True ({type(e).__name__}: "
                        f"{first}); {hint}") from None
    for key in NESTED_KEYS:
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UvitError(f"{path} does not hold a state dict of tensors; {hint}")
    return sd
