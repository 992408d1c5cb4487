"""The writer's side of the statistics collector (``collector.py``): the last snapshot, and when
a read may use it.

Reads never dump the kernel in the loop that commits. A read that needs the kernel's entries
takes the last snapshot if it is fresh enough (``usable``); if not, the loop keeps the request
and answers it when the next snapshot arrives (``loop.py``), and the collector is woken:

- every read needs a snapshot at most ``STALE_AFTER`` intervals old (the collector dumps every
  interval while it is read, so one interval plus the dump's time);
- ``/metrics`` needs one whose columns follow the writer's current rows (a new layout is sent
  to the collector, which answers at once);
- a read of one service's backends needs its entry from a dump taken after that service's
  last commit, so that a ``GET`` after a ``PATCH`` shows the kernel as the ``PATCH`` left it:
  the last whole snapshot if it is recent enough, else the collector dumps that one service
  (``entry``; a whole table at 10,000 backends is far more work than one service of it);
- a read of one service's own counters (``GET /service/<vs>``) takes the last snapshot.

``Snapshots`` owns one end of a socket pair; at the other end the collector runs as a child
process (``spawn_process``: the real kernel) or as a thread of this process (``spawn_thread``:
a fake kernel in tests and benchmarks). A collector that dies (its end closes) is started again
after ``RESPAWN_AFTER`` seconds, logged; the reads waiting meanwhile fail after their deadline.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from gorb.services.ipvs_writer.collector import (
    SCHEMA,
    Collector,
    FrameReader,
    Layout,
    Live,
    Snapshot,
    send_frame,
)

log = logging.getLogger(__name__)

STALE_AFTER = 2  # intervals after which a snapshot is not served (one, plus the dump's time)
RESPAWN_AFTER = 1.0


class Handle(Protocol):
    def close(self) -> None: ...


Spawn = Callable[[socket.socket, float], Handle]


class _Thread:
    def __init__(self, sock: socket.socket, kernel_factory: Callable[[], Any], interval: float):
        self._thread = threading.Thread(
            target=Collector(sock, kernel_factory, interval).run, name="ipvs-collector",
            daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._thread.join(timeout=5)


class _Process:
    def __init__(self, sock: socket.socket, interval: float, kernel_timeout: float,
                 log_level: str):
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "gorb.services.ipvs_writer.collector", "--fd",
             str(sock.fileno()), "--interval", str(interval), "--kernel-timeout",
             str(kernel_timeout), "--log-level", log_level],
            pass_fds=[sock.fileno()], stdin=subprocess.DEVNULL)
        sock.close()  # the child's now

    def close(self) -> None:
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def spawn_thread(kernel_factory: Callable[[], Any]) -> Spawn:
    return lambda sock, interval: _Thread(sock, kernel_factory, interval)


def spawn_process(kernel_timeout: float, log_level: str) -> Spawn:
    return lambda sock, interval: _Process(sock, interval, kernel_timeout, log_level)


class Snapshots:
    """The last snapshot from the collector ``spawn`` starts; ``clock`` is ``time.monotonic``
    (the collector's too)."""

    def __init__(self, spawn: Spawn, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self.latest: Snapshot | None = None
        # single services dumped since the last whole snapshot: SKey -> (taken, Live | None)
        self.entries: dict[Any, tuple[float, Live | None]] = {}
        self.failures = 0  # dumps the collector reported failed
        self.snapshots = 0  # snapshots received
        self._spawn = spawn
        self._sock: socket.socket | None = None
        self._reader: FrameReader | None = None
        self._handle: Handle | None = None
        self._woken = float("-inf")
        self._asked_for: dict[Any, float] = {}  # single services asked for, taken after
        self._layout_sent: int | None = None
        self._dead_since: float | None = None

    def start(self) -> None:
        mine, theirs = socket.socketpair()
        mine.setblocking(False)
        self._sock, self._reader = mine, FrameReader(mine)
        self._handle = self._spawn(theirs, self.interval)
        self._woken, self._asked_for = float("-inf"), {}
        self._layout_sent, self._dead_since = None, None

    def close(self) -> None:
        if self._sock is None:
            return
        try:
            send_frame(self._sock, {"v": SCHEMA, "type": "stop"})
        except OSError:
            pass
        self._handle.close()
        self._sock.close()
        self._sock = None

    def fileno(self) -> int:
        """What the loop polls (a new one after a respawn: ask again each time)."""
        return self._sock.fileno()

    def receive(self) -> bool:
        """Take what the collector sent; True if a snapshot or a failure arrived."""
        frames, closed = self._reader.read()
        for frame in frames:
            msg = msgspec.msgpack.decode(frame)
            if msg.get("type") == "snapshot":
                self.latest = Snapshot(msg)
                self.snapshots += 1
                self.entries = {k: e for k, e in self.entries.items()
                                if e[0] > self.latest.taken}
            elif msg.get("type") == "service":
                entry = msg["entry"]
                self.entries[tuple(msg["service"])] = (
                    msg["taken"], None if entry is None else Live(*entry))
            elif msg.get("type") == "failed":
                self.failures += 1
        if closed and self._dead_since is None:
            log.error("statistics: the collector exited; starting another in %.0f s",
                      RESPAWN_AFTER)
            self._dead_since = self.clock()
        return bool(frames)

    def check(self) -> None:
        """Start the collector again some time after it died (the loop calls this)."""
        if self._dead_since is not None and self.clock() - self._dead_since >= RESPAWN_AFTER:
            self._sock.close()
            self._handle.close()
            self.start()

    def usable(self) -> Snapshot | None:
        """The last snapshot if it was taken at most ``STALE_AFTER`` intervals ago; else None
        (and the collector is woken). A read counts as activity: it keeps the collector
        dumping."""
        snap, now = self.latest, self.clock()
        if snap is None or now - snap.taken > STALE_AFTER * self.interval:
            self._wake(now)
            return None
        self._wake(now, every=self.interval * 5)  # keep it dumping
        return snap

    def entry(self, key: Any, since: float) -> tuple[bool, Live | None]:
        """(found, the kernel's entry of the service ``key`` (None: it has none)) from a dump
        at most ``STALE_AFTER`` intervals old and taken after ``since`` (the service's last
        commit): the last whole snapshot, or a dump of that service alone. If neither will do,
        (False, None), and the collector is asked: for that service alone when the reason is a
        write the last snapshot predates (a read after a write), else for its next snapshot."""
        now = self.clock()
        bound = max(since, now - STALE_AFTER * self.interval)
        snap, one = self.latest, self.entries.get(key)
        if snap is not None and snap.taken >= bound and (one is None or one[0] <= snap.taken):
            self._wake(now, every=self.interval * 5)  # keep it dumping
            return True, snap.services.get(key)
        if one is not None and one[0] >= bound:
            self._wake(now, every=self.interval * 5)
            return True, one[1]
        newest = max(snap.taken if snap else float("-inf"), one[0] if one else float("-inf"))
        if since > newest and self._asked_for.get(key, float("-inf")) < since:
            self._send({"v": SCHEMA, "type": "wake", "after": since, "service": list(key)})
            self._asked_for[key] = since
        self._wake(now)
        return False, None

    def describe(self, generation: int, layout: Layout) -> None:
        """Send the collector the rows ``/metrics`` follows now (once per generation)."""
        if self._layout_sent != generation:
            self._send({"v": SCHEMA, "type": "layout", "generation": generation,
                        "services": [[list(skey), [list(d) for d in dkeys]]
                                     for skey, dkeys in layout]})
            self._layout_sent = generation

    def _wake(self, now: float, every: float | None = None) -> None:
        """Keep the collector dumping (a wake at most once per ``every`` seconds)."""
        if now - self._woken > (self.interval / 4 if every is None else every):
            self._send({"v": SCHEMA, "type": "wake"})
            self._woken = now

    def _send(self, msg: dict) -> None:
        if self._sock is None or self._dead_since is not None:
            return
        self._sock.setblocking(True)
        try:
            send_frame(self._sock, msg)
        except OSError:
            pass  # the collector is gone: receive() sees it closed
        finally:
            self._sock.setblocking(False)
