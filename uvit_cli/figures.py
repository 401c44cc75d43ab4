"""Figures written to files: matplotlib without a window, each figure saved atomically (whole or absent)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from .files import atomic_path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend; chosen when a figure is drawn, not at import, so importing
    the package has no side effects."""
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # after the backend choice, as matplotlib asks

    return plt


def save_png(fig, path: Path) -> Path:
    """Lay out a figure, write it to ``path`` atomically (making its folder) and close it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    pyplot().close(fig)
    return path
