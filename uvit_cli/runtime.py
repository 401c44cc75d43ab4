"""The runtime in one place: which device, which precision, and the backend flags.

Nothing here runs at import time: the CLI calls :func:`setup_runtime` once per process, so importing the library
never changes global torch state (unlike DiT's TF32 flags set at import).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

import torch

from .errors import UvitError

log = logging.getLogger(__name__)

# Autocast dtype of each recipe precision (recipe.Precision); fp32 runs without autocast.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_KINDS = ("auto", "cpu", "cuda", "cuda:N", "mps")


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def auto_device_type() -> str:
    """CUDA, then Apple MPS, then the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    if mps_available():
        return "mps"
    return "cpu"


def resolve_device(spec: str | torch.device | None = "auto", local_rank: int | None = None) -> torch.device:
    """The torch device for ``--device`` (auto, cpu, cuda, cuda:N, mps); a CUDA device without an index takes
    LOCAL_RANK (torchrun). A device this machine lacks is a UvitError naming what it has."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = auto_device_type()
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kind, _, index = spec.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()) or (index and kind != "cuda"):
        hint = " (PyTorch calls GPUs cuda)" if kind in ("gpu", "nvidia") else ""
        raise UvitError(f"--device {spec!r} is not a device{hint}; use one of {', '.join(DEVICE_KINDS)}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UvitError(f"--device {spec}: this machine has no usable CUDA GPU (torch {torch.__version__}, "
                            f"CUDA build {torch.version.cuda or 'none'}); use --device cpu"
                            + (" or mps" if mps_available() else ""))
        i = int(index) if index else local_rank
        if i >= torch.cuda.device_count():
            raise UvitError(f"--device {spec}: GPU {i} does not exist; this machine has {torch.cuda.device_count()}")
        return torch.device("cuda", i)
    if kind == "mps" and not mps_available():
        raise UvitError("--device mps: Apple's Metal backend is not available here; use --device cpu")
    return torch.device(kind)


def check_precision(device: torch.device | str, precision: str) -> None:
    """Refuse a precision the device cannot run (named with the fix)."""
    if precision not in DTYPES:
        raise UvitError(f"precision {precision!r} is not one of {', '.join(DTYPES)}")
    dev = torch.device(device)
    if precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UvitError(f"--precision bf16: {torch.cuda.get_device_name(dev)} has no bfloat16; use fp16 or fp32")
    if precision == "bf16" and dev.type == "mps" and not torch.backends.mps.is_macos_or_newer(14, 0):
        raise UvitError("--precision bf16: Apple's Metal backend has bfloat16 from macOS 14 on; use fp16 or fp32, "
                        "or update macOS")


def to_device(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``t`` as ``dtype`` on ``device``, cast before it moves: float64 arithmetic stays on the CPU, so a device
    without float64 (Apple MPS) never receives one (the diffusion schedules compute in float64)."""
    return t.to(dtype=dtype).to(device=device)


def autocast(device: torch.device | str, precision: str):
    """torch.autocast for bf16 / fp16 on the device, or a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[precision])


class StopRequest:
    """Set by the first SIGINT / SIGTERM while installed; the second one interrupts at once (KeyboardInterrupt)."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signal_name = True, signal.Signals(signum).name
        log.warning("%s received: stopping after the step in hand, keeping what is finished (press Ctrl-C "
                    "again to stop at once)", self.signal_name)


@contextlib.contextmanager
def graceful_stop():
    """Catch SIGINT and SIGTERM for a loop that can stop cleanly at its next step boundary; restores the previous
    handlers on exit. Outside the main thread (where Python allows no handlers) nothing is installed."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    old = {s: signal.signal(s, stop._handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: workers ignore Ctrl-C / SIGTERM, which reach the whole process group, so
    the main process stops cleanly (graceful_stop) instead of finding its workers dead."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def setup_runtime(device: torch.device | str, *, deterministic: bool = False) -> None:
    """Backend flags for this process: TF32 matmuls and convolutions on CUDA (what the benchmarks measure);
    ``deterministic`` picks fixed cuDNN algorithms (latent encoding, so a resumed shard matches bit for bit)."""
    if torch.device(device).type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
