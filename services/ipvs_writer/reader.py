"""The kernel's table with its statistics, read off the write path.

Statistics (``GET /service/<vs>``, every ``/metrics`` scrape) come from a snapshot: a thread of
the writer with a netlink socket of its own dumps the kernel every ``interval`` seconds
(``writer.stats_interval``) while someone reads, and the loop that commits only looks the
snapshot up (``usable``). After ``IDLE_AFTER`` intervals without a read the thread stops dumping,
so a writer nobody reads costs nothing; the first read after that, or one of a service changed
since the snapshot was taken (whose entry the snapshot may not show yet), finds no usable
snapshot and the engine asks the kernel itself, as before, for that once (and the thread wakes).

The snapshot is a plain dict replaced whole (an atomic assignment), never changed in place, so
the loop reads it without a lock. A dump that fails (the kernel stalls) is logged and retried at
the next interval; a snapshot older than ``STALE_AFTER`` intervals is not served.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from gorb.services.ipvs_writer.table import KService, SKey

log = logging.getLogger(__name__)

IDLE_AFTER = 30  # intervals without a read after which the thread stops dumping
STALE_AFTER = 3  # intervals after which a snapshot is not served


class Snapshots:
    """A thread that keeps a snapshot at most about ``interval`` seconds old while it is read.

    ``kernel_factory()`` makes the thread's own kernel adapter (a second netlink socket: one
    dump at a time per socket); ``clock`` is monotonic seconds."""

    def __init__(self, kernel_factory: Callable[[], Any], interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self._factory = kernel_factory
        # (clock() when the dump started, its table): one attribute, replaced whole
        self._snap: tuple[float, dict[SKey, KService]] = (float("-inf"), {})
        self._last_read = float("-inf")
        self._wake = threading.Event()
        self._stop = False
        self.dumps = 0
        self._thread = threading.Thread(target=self._run, name="ipvs-reader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=5)

    def usable(self, since: float = float("-inf")) -> dict[SKey, KService] | None:
        """The snapshot if it is fresh (at most ``STALE_AFTER`` intervals old) and was taken
        after ``since`` (a clock() reading: the service's last commit); else None, and a refresh
        is asked for. A read counts as activity: it keeps the thread dumping."""
        taken, table = self._snap
        now = self.clock()
        self._last_read = now
        if now - taken > self.interval:
            self._wake.set()
        if now - taken > STALE_AFTER * self.interval or taken < since:
            return None
        return table

    def idle(self) -> bool:
        """Whether the thread has stopped dumping (no reads for IDLE_AFTER intervals)."""
        return self.clock() - self._last_read > IDLE_AFTER * self.interval

    def _run(self) -> None:
        kernel = None
        while not self._stop:
            if self.idle():
                self._wake.wait()
                self._wake.clear()
                continue
            started = self.clock()
            try:
                kernel = kernel or self._factory()
                table = kernel.dump()
            except Exception as exc:  # a stalled or failing kernel: keep the stale snapshot
                log.error("statistics: the kernel dump failed (%s); retrying", exc)
                if kernel is not None:
                    kernel.close()
                kernel = None
            else:
                self._snap = (started, table)
                self.dumps += 1
            self._wake.wait(timeout=max(0.0, self.interval - (self.clock() - started)))
            self._wake.clear()
        if kernel is not None:
            kernel.close()
