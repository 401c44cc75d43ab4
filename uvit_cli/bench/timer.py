"""The one benchmark timer, the matmul peak MFU is measured against, the standard row, and the machine record."""

from __future__ import annotations

import platform
import statistics
import time

import torch


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a wall-clock interval covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device | str, *, warmup: int = 1, iters: int = 1, repeats: int = 3) -> list[float]:
    """Seconds per call of ``fn``: ``repeats`` measurements, each the mean of ``iters`` calls, after ``warmup``
    untimed calls. Report the median (:func:`median`)."""
    for _ in range(warmup):
        fn()
    sync(device)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        runs.append((time.perf_counter() - t0) / iters)
    return runs


def median(runs: list[float]) -> float:
    return statistics.median(runs)


def row(device, precision: str, runs: list[float], images: int, mfu: float | None = None, **extra) -> dict:
    """A result row with the standard keys: ``images`` are processed per timed call (one step)."""
    sec = median(runs)
    return {"device": str(device), "precision": precision, "img_per_s": images / sec, "sec_per_step": sec,
            "mfu": mfu, "runs": runs, **extra}


def matmul_peak(device: torch.device | str, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> float:
    """The device's own dense matmul rate (TFLOP/s) for square n x n products: the MFU denominator."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    runs = measure(lambda: a @ b, device, warmup=3, iters=20 if device.type == "cuda" else 5, repeats=repeats)
    return 2 * n ** 3 / median(runs) / 1e12


def machine() -> dict:
    """What ran the benchmark, for the record."""
    cpu = platform.processor() or platform.machine()
    try:                                          # Linux names the CPU model here; elsewhere keep the platform's
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
