import os
import tempfile

import pytest
import torch

# One throw-away cache per test session (the digits classifier, reference statistics), set before any fixture runs,
# so tests never write to the user's ~/.cache/uvit.
os.environ.setdefault("UVIT_CACHE", tempfile.mkdtemp(prefix="uvit-test-cache-"))

# Wide rich output so CLI tests can read whole table rows (set before uvit_cli creates its consoles).
os.environ.setdefault("COLUMNS", "200")

# Keep CPU tests predictable on small CI machines: under pytest-xdist every worker (and every subprocess it
# starts) gets one thread, so workers never fight over the cores (OpenMP spin-waits make that very slow).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


class CliResult:
    """What a `uvit` command gave: exit status and its two streams."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


@pytest.fixture
def uvit(capsys):
    """Run `uvit ARGS...` in this process through the real entry point (no process boundary to test)."""
    from uvit_cli.cli import main

    def run(*args) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return run
