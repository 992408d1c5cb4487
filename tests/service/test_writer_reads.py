"""Reads off the write path (``services/ipvs_writer/reader.py``): the statistics thread over a
fake kernel, and the engine serving GET and state.dump from its snapshot, asking the kernel
itself only for a service changed since the snapshot or when there is no fresh one."""

from __future__ import annotations

import threading
import time

import pytest

from gorb.services.ipvs_writer.engine import Engine
from gorb.services.ipvs_writer.reader import IDLE_AFTER, STALE_AFTER, Snapshots
from tests.pace import wait_until
from tests.service.fake_kernel import FakeKernel
from tests.unit.test_engine import OK, be_create, svc_create

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingKernel(FakeKernel):
    """A fake kernel that counts the calls of each kind and can block its dumps."""

    def __init__(self):
        super().__init__()
        self.counts = {"dump": 0, "service": 0}
        self.gate = threading.Event()
        self.gate.set()

    def dump(self):
        self.gate.wait()
        self.counts["dump"] += 1
        return super().dump()

    def service(self, svc):
        self.counts["service"] += 1
        return super().service(svc)


@pytest.fixture
def setup():
    clock = Clock()
    kernel = CountingKernel()
    reader_kernel = CountingKernel()
    reader_kernel.table = kernel.table  # the same table, as a second socket sees it
    reader_kernel._lock = kernel._lock
    snaps = Snapshots(lambda: reader_kernel, interval=1.0, clock=clock)
    engine = Engine({}, kernel, lambda s: None, snapshots=snaps)
    for req in (svc_create(), be_create()):
        [(reply, _)] = engine.handle_batch([req])
        assert reply == OK
    snaps.start()
    yield engine, kernel, reader_kernel, snaps, clock
    snaps.close()


def test_reads_use_a_fresh_snapshot_and_never_dump_in_the_loop(setup):
    engine, kernel, reader_kernel, snaps, clock = setup
    # no snapshot yet: this read asks the kernel itself, and wakes the thread
    assert engine.read("state.dump", {"stats": True})["ok"]
    assert kernel.counts["dump"] == 1
    wait_until(lambda: snaps.dumps == 1, 10, "the reader's first dump", every=0.005)
    clock.now += 0.5
    for _ in range(5):
        assert engine.read("state.dump", {"stats": True})["ok"]
        assert engine.read("service.get", {"service": "web"})["data"]["kernel"] is not None
    assert kernel.counts == {"dump": 1, "service": 0}  # all from the snapshot


def test_a_service_changed_after_the_snapshot_is_read_from_the_kernel(setup):
    engine, kernel, reader_kernel, snaps, clock = setup
    engine.read("state.dump", {"stats": True})
    wait_until(lambda: snaps.dumps == 1, 10, "the reader's first dump", every=0.005)
    clock.now += 0.1
    [(reply, _)] = engine.handle_batch([("backend.update", {"service": "web", "backend": "a",
                                                            "weight": 9})])
    assert reply == OK
    view = engine.read("backend.get", {"service": "web", "backend": "a"})["data"]
    assert view["kernel"]["weight"] == 9  # not the snapshot's 100
    assert kernel.counts["service"] == 1


def test_a_stale_snapshot_is_not_served_and_an_idle_reader_stops_dumping(setup):
    engine, kernel, reader_kernel, snaps, clock = setup
    engine.read("state.dump", {"stats": True})
    wait_until(lambda: snaps.dumps == 1, 10, "the reader's first dump", every=0.005)
    reader_kernel.gate.clear()  # the kernel stops answering the reader
    clock.now += STALE_AFTER + 0.5
    engine.read("state.dump", {"stats": True})
    assert kernel.counts["dump"] == 2  # too old: asked the kernel itself
    reader_kernel.gate.set()
    wait_until(lambda: snaps.dumps >= 2, 10, "a refresh", every=0.005)
    clock.now += IDLE_AFTER + 1  # no reads since: idle
    done = snaps.dumps
    snaps._wake.set()
    time.sleep(0.05)
    assert snaps.idle() and snaps.dumps == done
