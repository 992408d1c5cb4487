"""The statistics collector: the kernel's table with its counters, dumped and encoded away from
the loop that commits.

The writer's reads (``GET /service/<vs>``, every ``/metrics`` scrape) show the kernel's counters.
Dumping and decoding 10,000 dests costs the writer's interpreter about a second of the guest's
CPU, so neither happens in the writer's process: a collector, a child process of the writer
(``python -m gorb.services.ipvs_writer.collector``, the writer's credentials, niced so that a
commit always runs before it), dumps the kernel every ``interval`` seconds while the writer asks
for snapshots, and sends each one over a socket pair as one frame the writer stores without
decoding the bulk of it:

- the ``/metrics`` columns of the kernel's side, aligned to the rows the writer last described
  (``layout``: its services in order, each with its dests in order, and the label generation that
  names them), each column already msgpack, which the writer splices into its reply unread;
- per service, the kernel's view of it (``scheduler``, ``flags``, ``timeout``, ``netmask``,
  ``stats``) and its dests as one msgpack blob the writer decodes only when a read asks for them.

Frames, either way: a 4-byte big-endian length, then a msgpack map with ``v`` (``SCHEMA``) and
``type``::

    writer -> collector  {"v": 1, "type": "wake"}                 reads go on: keep dumping
                         {"v": 1, "type": "wake", "after": T, "service": skey}
                                                                  one service's entry, taken
                                                                  after T (a read after a write)
                         {"v": 1, "type": "layout", "generation": G,
                          "services": [[skey, [[addr, port], ...]], ...]}
                         {"v": 1, "type": "stop"}
    collector -> writer  {"v": 1, "type": "snapshot", "taken": T, "generation": G | null,
                          "service_stats": raw, "kernel_weight": raw, "stats": raw,
                          "services": [[skey, view, dests raw], ...]}
                         {"v": 1, "type": "service", "taken": T, "service": skey,
                          "entry": [view, dests raw] | null}      (null: the kernel has none)
                         {"v": 1, "type": "failed", "error": "..."}

``taken`` is ``time.monotonic()`` when the dump started (one clock for both processes). A new
layout is answered at once with the last table's columns in it (no new dump). After
``IDLE_AFTER`` intervals without a wake the collector stops dumping. Over a fake kernel (tests,
benchmarks on a host without IPVS) the same collector runs as a thread of the writer.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import operator
import os
import selectors
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgspec

from gorb.services.ipvs_writer.table import DKey, KDest, KService, SKey

log = logging.getLogger(__name__)

SCHEMA = 1
IDLE_AFTER = 30  # intervals without a wake after which the collector stops dumping
SERVICE_COUNTERS = ("conns", "inpkts", "outpkts", "inbytes", "outbytes")
BACKEND_STATS = SERVICE_COUNTERS + ("activeconns", "inactconns", "persistconns")
Layout = list[tuple[SKey, list[DKey]]]

_encode = msgspec.msgpack.Encoder().encode
_LENGTH = struct.Struct(">I")


# --- what a snapshot holds (pure) ---------------------------------------------------------------

def kernel_view(k: KService) -> dict:
    """A service as reads show the kernel's entry of it."""
    return {"scheduler": k.sched, "flags": k.flags, "timeout": k.timeout, "netmask": k.netmask,
            "stats": k.stats}


def dest_view(d: KDest) -> dict:
    return {"weight": d.weight, "fwd": d.fwd, "stats": d.stats}


def columns(table: Mapping[SKey, KService], layout: Layout) -> dict[str, Any]:
    """The kernel's ``/metrics`` columns for the rows of ``layout``: ``service_stats`` (counter
    -> one value per service), ``kernel_weight`` and ``stats`` (counter -> one value per dest);
    null where the kernel has no entry."""
    kservices = [table.get(skey) for skey, _ in layout]
    kdests: list[KDest | None] = []
    for k, (_, dkeys) in zip(kservices, layout):
        kdests += [None] * len(dkeys) if k is None else map(k.dests.get, dkeys)
    return {"service_stats": transpose([k.stats if k else None for k in kservices],
                                       SERVICE_COUNTERS),
            "kernel_weight": [d.weight if d is not None else None for d in kdests],
            "stats": transpose([d.stats if d is not None else None for d in kdests],
                               BACKEND_STATS)}


def transpose(stats: list[dict | None], keys: tuple[str, ...]) -> dict[str, list]:
    """{key: [each row's stats[key], null for a row without stats or without that key]}."""
    absent = (None,) * len(keys)
    pick = operator.itemgetter(*keys)
    try:
        rows = [pick(s) if s is not None else absent for s in stats]
    except KeyError:  # a partial stats map (never from the kernel's dump): the slow way
        rows = [tuple(s.get(k) for k in keys) if s is not None else absent for s in stats]
    if not rows:
        return {k: [] for k in keys}
    return {k: list(col) for k, col in zip(keys, zip(*rows))}


def _entry(k: KService) -> list:
    return [kernel_view(k), _encode([[d.addr, d.port, d.weight, d.fwd, d.stats]
                                     for d in k.dests.values()])]


def service_frame(skey: SKey, k: KService | None, taken: float) -> bytes:
    """The ``service`` message: one service's entry (or null), dumped at ``taken``."""
    return _encode({"v": SCHEMA, "type": "service", "taken": taken, "service": list(skey),
                    "entry": None if k is None else _entry(k)})


def snapshot_frame(table: Mapping[SKey, KService], taken: float,
                   layout: tuple[int, Layout] | None) -> bytes:
    """The ``snapshot`` message of ``table`` (dumped at ``taken``) for ``layout``
    ((generation, rows) or None: no columns yet)."""
    cols = columns(table, layout[1]) if layout is not None else None
    return _encode({
        "v": SCHEMA, "type": "snapshot", "taken": taken,
        "generation": None if layout is None else layout[0],
        **{name: None if cols is None else _encode(cols[name])
           for name in ("service_stats", "kernel_weight", "stats")},
        "services": [[list(skey), *_entry(k)] for skey, k in table.items()]})


class Live:
    """One service's kernel entry as a snapshot holds it: ``view`` (``kernel_view``) and
    ``dests`` ((addr, port) -> ``dest_view``), decoded from its blob at the first read."""

    __slots__ = ("view", "_blob", "_dests")

    def __init__(self, view: dict, blob: bytes | None = None,
                 dests: dict[DKey, dict] | None = None):
        self.view, self._blob, self._dests = view, blob, dests

    @classmethod
    def of(cls, k: KService) -> Live:
        return cls(kernel_view(k), dests={key: dest_view(d) for key, d in k.dests.items()})

    @property
    def dests(self) -> dict[DKey, dict]:
        if self._dests is None:
            self._dests = {(a, p): {"weight": w, "fwd": f, "stats": s}
                           for a, p, w, f, s in msgspec.msgpack.decode(self._blob)}
            self._blob = None
        return self._dests


class Snapshot:
    """A decoded ``snapshot`` frame: ``taken``, ``generation`` (of the layout its columns
    follow), the raw columns and ``services`` (SKey -> ``Live``)."""

    __slots__ = ("taken", "generation", "service_stats", "kernel_weight", "stats", "services")

    def __init__(self, msg: dict):
        self.taken: float = msg["taken"]
        self.generation: int | None = msg["generation"]
        self.service_stats = _raw(msg["service_stats"])
        self.kernel_weight = _raw(msg["kernel_weight"])
        self.stats = _raw(msg["stats"])
        self.services: dict[SKey, Live] = {tuple(skey): Live(view, blob)
                                           for skey, view, blob in msg["services"]}

    @classmethod
    def of(cls, table: Mapping[SKey, KService], taken: float,
           layout: tuple[int, Layout] | None) -> Snapshot:
        """The snapshot of ``table`` as the writer would receive it (the writer without a
        collector, over a fake kernel, reads through this too)."""
        return cls(msgspec.msgpack.decode(snapshot_frame(table, taken, layout)))


def _raw(blob: bytes | None) -> msgspec.Raw | None:
    return None if blob is None else msgspec.Raw(blob)


# --- framing -------------------------------------------------------------------------------------

def send_frame(sock: socket.socket, msg: dict | bytes) -> None:
    data = msg if isinstance(msg, bytes) else _encode(msg)
    sock.sendall(_LENGTH.pack(len(data)) + data)


class FrameReader:
    """Whole frames out of a non-blocking socket, as they complete."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buf = bytearray()

    def read(self) -> tuple[list[bytes], bool]:
        """(the frames completed by what could be read now, whether the peer has closed)."""
        closed = False
        while True:
            try:
                chunk = self.sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            self._buf += chunk
        frames = []
        while len(self._buf) >= 4:
            (n,) = _LENGTH.unpack_from(self._buf)
            if len(self._buf) < 4 + n:
                break
            frames.append(bytes(self._buf[4:4 + n]))
            del self._buf[:4 + n]
        return frames, closed


# --- the collector's loop (a child process, or a thread over a fake kernel) -------------------

class Collector:
    """Dumps ``kernel_factory()``'s table every ``interval`` seconds while woken, and sends
    each snapshot to ``sock`` (the writer's end of the pair)."""

    def __init__(self, sock: socket.socket, kernel_factory: Callable[[], Any],
                 interval: float, clock: Callable[[], float] = time.monotonic):
        self.sock, self.interval, self.clock = sock, interval, clock
        self._factory = kernel_factory
        self._layout: tuple[int, Layout] | None = None
        self._last: tuple[float, Mapping[SKey, KService]] | None = None
        self._woken = float("-inf")
        self._started = float("-inf")  # when the last dump started
        self._services: dict[SKey, float] = {}  # one service's entry asked for, taken after

    def run(self) -> None:
        """Until the writer says stop or its end closes; then this end closes (a collector that
        dies shows the writer a closed socket)."""
        self.sock.setblocking(False)
        try:
            self._loop(FrameReader(self.sock), float("-inf"))
        finally:
            self.sock.close()

    def _loop(self, reader: FrameReader, due: float) -> None:
        kernel = None
        with selectors.DefaultSelector() as sel:
            sel.register(self.sock, selectors.EVENT_READ)
            while True:
                sel.select(self._wait(due))
                frames, closed = reader.read()
                if closed or not self._handle(frames):
                    break
                if self._services:
                    kernel = self._dump_services(kernel)
                if self._wait(due) == 0:
                    due = self.clock() + self.interval
                    kernel = self._dump(kernel)
        if kernel is not None:
            kernel.close()

    def _wait(self, due: float) -> float | None:
        """Seconds until the next dump is due; None: none is (no wake for IDLE_AFTER
        intervals). A service asked for alone is due now."""
        now = self.clock()
        if self._services:
            return 0
        if now - self._woken > IDLE_AFTER * self.interval:
            return None
        return max(0.0, due - now)

    def _handle(self, frames: Iterable[bytes]) -> bool:
        """Act on the writer's messages; False: stop."""
        for frame in frames:
            msg = msgspec.msgpack.decode(frame)
            if msg.get("type") == "stop":
                return False
            if msg.get("type") == "wake" and msg.get("service") is not None:
                skey = tuple(msg["service"])
                self._services[skey] = max(self._services.get(skey, float("-inf")),
                                           msg["after"])
            elif msg.get("type") == "wake":
                self._woken = self.clock()
            elif msg.get("type") == "layout":
                self._layout = (msg["generation"],
                                [(tuple(skey), [tuple(d) for d in dkeys])
                                 for skey, dkeys in msg["services"]])
                if self._last is not None:
                    self._send(snapshot_frame(self._last[1], self._last[0], self._layout))
        return True

    def _dump(self, kernel: Any) -> Any:
        started = self._started = self.clock()
        try:
            kernel = kernel or self._factory()
            table = kernel.dump()
        except Exception as exc:  # a stalled or failing kernel: say so, retry next interval
            return self._failed(kernel, "the kernel dump", exc)
        self._last = (started, table)
        self._send(snapshot_frame(table, started, self._layout))
        return kernel

    def _dump_services(self, kernel: Any) -> Any:
        """The services asked for one by one (a read after a write: far cheaper than the whole
        table), unless the last whole dump started after what they ask."""
        wanted, self._services = self._services, {}
        for skey, after in wanted.items():
            if self._last is not None and after <= self._started:
                continue  # the last whole snapshot, sent, is recent enough
            started = self.clock()
            try:
                kernel = kernel or self._factory()
                found = kernel.service(KService(*skey))
            except Exception as exc:
                return self._failed(kernel, "the kernel dump of one service", exc)
            self._send(service_frame(skey, found, started))
        return kernel

    def _failed(self, kernel: Any, what: str, exc: Exception) -> None:
        """Log and report a failed dump; the kernel adapter is dropped (a new one next time)."""
        log.error("statistics: %s failed (%s); retrying", what, exc)
        self._send({"v": SCHEMA, "type": "failed", "error": str(exc)})
        if kernel is not None:
            kernel.close()

    def _send(self, msg: dict | bytes) -> None:
        self.sock.setblocking(True)
        try:
            send_frame(self.sock, msg)
        finally:
            self.sock.setblocking(False)


# --- the child process --------------------------------------------------------------------------

NICENESS = 5  # a commit of the writer preempts the collector's decoding
PR_SET_PDEATHSIG = 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gorb-ipvs-collector")
    p.add_argument("--fd", type=int, required=True, help="the writer's socket pair end")
    p.add_argument("--interval", type=float, required=True)
    p.add_argument("--kernel-timeout", type=float, required=True)
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    from gorb.common import logs
    from gorb.services.ipvs_writer.netlink import Kernel
    logs.setup(a.log_level)
    # the writer's death ends the collector (its socket's end closes too: belt and braces)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    os.nice(NICENESS)
    sock = socket.socket(fileno=a.fd)
    Collector(sock, lambda: Kernel(timeout=a.kernel_timeout), a.interval).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
