import os

import pytest
import torch

# Wide rich output so CLI tests can read whole table rows (set before uvit_cli creates its consoles).
os.environ.setdefault("COLUMNS", "200")

# Keep CPU tests predictable on small CI machines: under pytest-xdist every worker (and every subprocess it
# starts) gets one thread, so workers never fight over the cores (OpenMP spin-waits make that very slow).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test sees its own UVIT_CACHE unless it sets one, so nothing leaks between tests."""
    if "UVIT_CACHE" not in os.environ:
        monkeypatch.setenv("UVIT_CACHE", str(tmp_path_factory.getbasetemp() / "uvit-cache"))
