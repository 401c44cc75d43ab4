"""Work cut into index ranges, each range written atomically as one ``.npz`` part file: the resumable unit of the
sample store and of the many-process feature pass.

A part is finished when its file exists (atomic writes: a killed writer leaves only a hidden temporary, removed at
the next start). Files are named ``<prefix>_<start:09d>_<count>.npz``, so a part of a longer job (another n) is
reused when it holds enough rows. Under torchrun rank 0 lists the missing parts and hands them out round-robin
(``distributed.share``): which rank makes a part, and how many ranks a killed job had, never changes its bytes.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .. import distributed
from ..errors import Interrupted, UvitError
from ..files import atomic_path
from ..runtime import graceful_stop

log = logging.getLogger(__name__)


class Parts:
    """Parts of ``size`` rows covering rows 0..n-1, stored in ``root``."""

    def __init__(self, root: str | Path, n: int, size: int, prefix: str = "chunk"):
        if n < 1 or size < 1:
            raise ValueError(f"parts need n >= 1 and size >= 1, got {n}, {size}")
        self.root, self.n, self.size, self.prefix = Path(root), int(n), int(size), prefix
        self.starts = list(range(0, self.n, self.size))

    def count(self, start: int) -> int:
        return min(self.size, self.n - start)

    def path(self, start: int) -> Path:
        return self.root / f"{self.prefix}_{start:09d}_{self.count(start)}.npz"

    def _finished(self) -> dict[int, int]:
        """start -> rows of every finished part file (the longest one of a start)."""
        out: dict[int, int] = {}
        if self.root.is_dir():
            for p in self.root.glob(f"{self.prefix}_*_*.npz"):
                try:
                    start, rows = (int(x) for x in p.stem.rsplit("_", 2)[1:])
                except ValueError:
                    continue
                out[start] = max(rows, out.get(start, 0))
        return out

    def find(self, start: int) -> Optional[Path]:
        """A finished part that starts at ``start`` and holds at least the rows this job needs."""
        rows = self._finished().get(start, 0)
        return self.root / f"{self.prefix}_{start:09d}_{rows}.npz" if rows >= self.count(start) else None

    def missing(self) -> list[int]:
        have = self._finished()
        return [s for s in self.starts if have.get(s, 0) < self.count(s)]

    def done(self) -> int:
        """Rows in finished parts."""
        have = self._finished()
        return sum(self.count(s) for s in self.starts if have.get(s, 0) >= self.count(s))

    def write(self, start: int, arrays: dict) -> Path:
        path = self.path(start)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:   # a file object: np.savez would append ".npz"
            np.savez(f, **arrays)
        return path

    def read(self, start: int) -> dict[str, np.ndarray]:
        path = self.find(start)
        if path is None:
            raise UvitError(f"part {start} of {self.root} is missing; rerun the same command to make it")
        k = self.count(start)
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
        return {name: a[:k] if a.ndim else a for name, a in arrays.items()}

    def remove_temporaries(self) -> None:
        """Delete what killed writers left (only when no writer of this job is running: before work starts)."""
        if self.root.is_dir():
            for p in self.root.glob(f".{self.prefix}_*.tmp"):
                p.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class Tracker:
    """One progress report for the whole job on rank 0: rows in finished parts (every rank's, counted on disk)
    plus the fraction of rank 0's part in flight. Polls in a thread while the job runs."""

    def __init__(self, progress: Optional[Callable[[int, int], None]] = None, interval: float = 0.5):
        self.progress = progress if distributed.is_main() else None
        self.interval = interval
        self.parts: Optional[Parts] = None
        self._inflight: tuple[int, float] | None = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._last = -1

    def inflight(self, start: int, fraction: float) -> None:
        """Rank 0's part at ``start`` is ``fraction`` done (e.g. from generate()'s NFE count)."""
        self._inflight = (start, fraction)

    def report(self) -> None:
        if self.progress is None or self.parts is None:
            return
        done = self.parts.done()
        if self._inflight is not None:
            start, fraction = self._inflight
            if self.parts.find(start) is None:
                done += int(fraction * self.parts.count(start))
        done = min(done, self.parts.n)
        if done != self._last:
            self._last = done
            self.progress(done, self.parts.n)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.report()

    def start(self, parts: Parts) -> None:
        self.parts = parts
        self.report()
        if self.progress is not None:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._inflight = None
        self.report()


def make_parts(parts: Parts, make: Callable[[int, int], dict], *, all_ranks: bool = False,
               prepare: Optional[Callable[[], None]] = None, tracker: Optional[Tracker] = None,
               what: str = "the job") -> list[int]:
    """Make every missing part with ``make(start, stop) -> arrays``; returns the starts made in this job (by all
    ranks).

    ``all_ranks``: every rank of the process group calls this; rank 0 runs ``prepare()`` (a UvitError there is
    raised on every rank), lists the missing parts and shares them out; after its share each rank waits for the
    others (a rank that died is an error within the process-group timeout, the finished parts stay).
    """
    def plan() -> list[int]:
        if prepare is not None:
            prepare()
        parts.root.mkdir(parents=True, exist_ok=True)
        parts.remove_temporaries()
        return parts.missing()

    if all_ranks:
        missing, mine = distributed.share(distributed.first_error(plan))
    else:
        missing = mine = plan()
    if missing and len(missing) < len(parts.starts) and distributed.is_main():
        log.info("resuming %s: %d of %d already done in %s", what, parts.done(), parts.n, parts.root)
    tracker = tracker or Tracker()
    tracker.start(parts)
    try:
        with graceful_stop() as stop:   # Ctrl-C / SIGTERM: finish the part in hand, keep it, stop
            for s in mine:
                parts.write(s, make(s, s + parts.count(s)))
                if stop.requested and s != mine[-1]:
                    raise Interrupted(f"{what} stopped by {stop.signal_name}: kept {parts.done()} of {parts.n} "
                                      f"in {parts.root} (whole parts of {parts.size}, written atomically)",
                                      same_command=True)
        if all_ranks:
            distributed.barrier(what)
    finally:
        tracker.stop()
    return missing
