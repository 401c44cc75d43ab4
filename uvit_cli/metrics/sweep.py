"""A sampling sweep's results: one run scored at several values of one sampling setting (``uvit fid --sweep``),
as a JSON document and a figure with one panel per metric.

The best guidance scale moves with training (DiT, LightningDiT), and the formulations differ most at low NFE, so
a researcher scores one set of weights at several w, intervals or step counts; each value keeps its own samples.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..figures import pyplot, save_png

LOWER_IS_BETTER = {"fid", "sfid", "kid", "fd_digits"}   # the others (is, precision, recall, acc_digits): higher


def value_label(v) -> str:
    """A swept value as a short label: 1.5, [0.2, 0.8], heun."""
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(value_label(x) for x in v) + "]"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _numeric(values: list) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def sweep_document(key: str, values: list, results: list[dict]) -> dict:
    """The JSON a sweep writes: the swept key, and per value its metrics and protocol card."""
    return {"sweep": key, "values": values,
            "results": [{"value": v, **r} for v, r in zip(values, results)]}


def best_values(key: str, values: list, results: list[dict]) -> dict:
    """For each metric, the swept value that scores best (ties: the first)."""
    best = {}
    for name in results[0]["metrics"] if results else ():
        scores = [r["metrics"].get(name, math.nan) for r in results]
        finite = [(s, i) for i, s in enumerate(scores) if math.isfinite(s)]
        if finite:
            pick = min(finite) if name in LOWER_IS_BETTER else max(finite, key=lambda t: (t[0], -t[1]))
            best[name] = values[pick[1]]
    return best


def plot_sweep(key: str, values: list, results: list[dict], path: Path, title: str = "") -> Path:
    """One panel per metric against the swept value (a numeric axis when every value is a number, else one tick
    per value in the order given); written atomically."""
    names = list(results[0]["metrics"]) if results else []
    fig, axes = pyplot().subplots(1, max(1, len(names)), figsize=(3.4 * max(1, len(names)), 3.0), dpi=120, squeeze=False)
    xs = values if _numeric(values) else list(range(len(values)))
    for ax, name in zip(axes[0], names):
        ys = [r["metrics"].get(name, math.nan) for r in results]
        ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.6)
        ax.set_xticks(xs, [value_label(v) for v in values], fontsize=7, rotation=0 if _numeric(values) else 20)
        ax.set_xlabel(key, fontsize=8)
        ax.set_title(f"{name} ({'lower' if name in LOWER_IS_BETTER else 'higher'} is better)", fontsize=9)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=8, color="gray")
    return save_png(fig, path)
