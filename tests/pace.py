"""How fast this machine (or this guest) is today, and the tests' time limits scaled by it.

A time limit in a test is written as a reference duration: how long the wait may take, with its
margin, on a quiet machine of the kind the test runs on (this host, or the user-mode-linux guest
when ``GORB_SANDBOX=1``). ``limit(seconds)`` scales it by ``factor()``, measured once per
process (once per pytest session) from three figures, each the median of a few runs, set
against the same figures recorded on a quiet run (``REFERENCE``):

- ``cpu``: a fixed pure-Python workload (what a busy core costs every process);
- ``spawn``: a Python subprocess started until it answers over ZeroMQ, having imported zmq (what
  starting a writer, an API or supervisord's programs costs);
- ``zmq``: a request/reply round trip to that subprocess over ipc:// (what a request on the bus
  costs).

The factor is the largest of the three ratios and never below 1: a quiet machine keeps the
reference limits, a busy one (or a slower kind of machine) gets longer ones, so a test fails on a
bug and not on a machine that is busy. ``wait_until(predicate, seconds, what)`` is the one poll
of the tests: its failure says what it waited for, the scaled limit and the factor.

Not limits: a timeout that is the behaviour under test (an ``api.writer_timeout`` of 0.5 s that a
test checks is honoured) stays as configured; the test's bound on how long that behaviour may
take to show is a limit. A window in which something must *not* happen is not one either (a busy
machine can only make it pass more easily).

``python -m tests.pace`` prints this machine's figures; ``REFERENCE`` holds those of quiet runs
(re-record them when the machines change).
"""

from __future__ import annotations

import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import zmq

T = TypeVar("T")

IN_GUEST = os.environ.get("GORB_SANDBOX") == "1"

# Seconds, from 30 runs of `python -m tests.pace` on the development machine (2 shared cores) and
# 10 in the user-mode-linux guest booted on it (tests/sandbox/uml.py), with GORB_SANDBOX=1: cpu
# and spawn near the fastest runs; zmq at the usual figure (on an idle host a round trip that
# wakes a sleeping core is the slow one, about twice the fastest).
REFERENCE = {
    "host": {"cpu": 0.020, "spawn": 0.060, "zmq": 0.00015},
    "guest": {"cpu": 0.100, "spawn": 0.480, "zmq": 0.0013},
}

_ROUND_TRIPS = 50
_ECHO = """\
import sys, zmq
s = zmq.Context().socket(zmq.REP)
s.connect(sys.argv[1])
for _ in range(int(sys.argv[2])):
    s.send(s.recv())
"""


@dataclass(frozen=True)
class Speed:
    """Measured seconds of each figure, against the reference of this kind of machine."""

    kind: str
    cpu: float
    spawn: float
    zmq: float

    def ratios(self) -> dict[str, float]:
        ref = REFERENCE[self.kind]
        return {name: getattr(self, name) / ref[name] for name in ref}

    @property
    def factor(self) -> float:
        return max(1.0, *self.ratios().values())

    def __str__(self) -> str:
        r = self.ratios()
        return (f"pace {self.factor:.2f} on the {self.kind} (time limits x that): "
                f"cpu {self.cpu * 1e3:.1f} ms ({r['cpu']:.2f}x), "
                f"spawn {self.spawn * 1e3:.0f} ms ({r['spawn']:.2f}x), "
                f"zmq round trip {self.zmq * 1e6:.0f} us ({r['zmq']:.2f}x)")


def _cpu_once() -> float:
    started = time.perf_counter()
    table = {}
    for i in range(40_000):
        table[str(i)] = i * i % 7919
    sorted(table, key=table.__getitem__)
    return time.perf_counter() - started


def _spawn_and_zmq_once(ctx: zmq.Context, where: str) -> tuple[float, float]:
    """One echo subprocess: seconds until its first reply, then seconds per round trip."""
    endpoint = f"ipc://{where}/echo"
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    sock.bind(endpoint)
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _ECHO, endpoint, str(_ROUND_TRIPS + 1)])
    try:
        sock.send(b"x")
        if not sock.poll(120_000):
            raise RuntimeError("tests.pace: the echo subprocess never answered")
        sock.recv()
        spawned = time.perf_counter()
        for _ in range(_ROUND_TRIPS):
            sock.send(b"x")
            sock.recv()
        trips = (time.perf_counter() - spawned) / _ROUND_TRIPS
        proc.wait(60)
        return spawned - started, trips
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()


def measure(runs: int = 3) -> Speed:
    """This machine's figures now: the median of ``runs`` runs of each (cpu: of 2 * runs + 1)."""
    cpu = statistics.median(_cpu_once() for _ in range(2 * runs + 1))
    ctx = zmq.Context()
    try:
        with tempfile.TemporaryDirectory(prefix="gorb-pace-", dir="/tmp") as where:
            pairs = [_spawn_and_zmq_once(ctx, where) for _ in range(runs)]
    finally:
        ctx.destroy(linger=0)
    return Speed("guest" if IN_GUEST else "host", cpu, statistics.median(p[0] for p in pairs),
                 statistics.median(p[1] for p in pairs))


@functools.cache
def speed() -> Speed:
    """This process's one measurement (taken on first use)."""
    return measure()


def factor() -> float:
    """How much slower than the quiet reference this machine is now; at least 1."""
    return speed().factor


def limit(seconds: float, fixed: float = 0.0) -> float:
    """A reference duration (a quiet machine's, margin included) scaled by this machine's pace;
    plus ``fixed``: seconds of the behaviour under test itself (a configured interval or
    timeout), which do not depend on the machine."""
    return fixed + seconds * factor()


def wait_until(predicate: Callable[[], T], seconds: float, what: str | Callable[[], str],
               every: float = 0.05, fixed: float = 0.0,
               ignoring: tuple[type[BaseException], ...] = (),
               until: Callable[[T], object] | None = None) -> T:
    """Call ``predicate`` every ``every`` s until it returns something truthy (with ``until``:
    something ``until`` accepts, e.g. ``want.__eq__``), and return that; fail after
    ``limit(seconds, fixed)`` with what was waited for (``what``, or what it returns: a log read
    only on failure), the limit, the factor and the last value. An exception of ``ignoring``
    counts as not yet (the last one is shown); any other propagates at once, so a predicate can
    give up early (``assert proc.poll() is None``)."""
    scaled = limit(seconds, fixed)
    deadline = time.monotonic() + scaled
    while True:
        try:
            last: Any = predicate()
        except ignoring as exc:
            last = exc
        else:
            if (until or bool)(last):
                return last
        if time.monotonic() >= deadline:
            said = what() if callable(what) else what
            configured = f"{fixed:g} s as configured + " if fixed else ""
            raise AssertionError(f"waited {scaled:.1f} s for {said} ({configured}a limit of "
                                 f"{seconds:g} s at pace {factor():.2f}); last: {last!r}")
        time.sleep(every)


if __name__ == "__main__":
    print(measure())
