"""Reads off the write path (``services/ipvs_writer/reader.py``, ``collector.py``): the statistics
collector over a fake kernel (a thread; in production a child process, tested in the sandbox),
and the writer serving GET, state.dump and metrics.rows from its snapshots without ever asking
the kernel itself: a read that needs a newer snapshot waits for it."""

from __future__ import annotations

import socket
import threading
import time

import msgspec
import pytest
import zmq

from gorb.common import runtime
from gorb.common.transport import RequestClient
from gorb.services.ipvs_writer import reader
from gorb.services.ipvs_writer.collector import IDLE_AFTER, Collector, FrameReader, send_frame
from gorb.services.ipvs_writer.engine import Engine, Pinned
from gorb.services.ipvs_writer.loop import WriterLoop
from gorb.services.ipvs_writer.reader import Snapshots
from tests.pace import limit, wait_until
from tests.service.fake_kernel import FakeKernel
from tests.unit.test_engine import OK, be_create, svc_create

pytestmark = pytest.mark.timeout(60)
INTERVAL = 0.05


class CountingKernel(FakeKernel):
    """A fake kernel that counts the calls of each kind and can block its dumps."""

    def __init__(self):
        super().__init__()
        self.counts = {"dump": 0, "service": 0}
        self.gate = threading.Event()
        self.gate.set()
        self.die = False

    def dump(self):
        self.gate.wait()
        if self.die:
            raise SystemExit("the collector dies")
        self.counts["dump"] += 1
        return super().dump()

    def service(self, svc):
        self.gate.wait()
        if self.die:
            raise SystemExit("the collector dies")
        self.counts["service"] += 1
        return super().service(svc)


@pytest.fixture
def setup():
    kernel = CountingKernel()
    collector_kernel = CountingKernel()
    collector_kernel.table = kernel.table  # the same table, as a second socket sees it
    collector_kernel._lock = kernel._lock
    snaps = Snapshots(reader.spawn_thread(lambda: collector_kernel), interval=INTERVAL)
    engine = Engine({}, kernel, lambda s: None, snapshots=snaps)
    for req in (svc_create(), be_create()):
        [(reply, _)] = engine.handle_batch([req])
        assert reply == OK
    snaps.start()
    kernel.counts = {"dump": 0, "service": 0}
    yield engine, kernel, collector_kernel, snaps
    snaps.close()


def read_when_ready(engine: Engine, snaps: Snapshots, type_: str, body: dict) -> dict:
    """Ask as the loop does: again each time a snapshot arrives, until it is answered."""
    pinned = None
    while True:
        reply = engine.read(type_, body, pinned)
        if not isinstance(reply, Pinned):
            return reply
        pinned = reply
        wait_until(snaps.receive, 10, f"a snapshot for {type_}", every=0.005)


def test_reads_wait_for_a_snapshot_and_never_ask_the_kernel_in_the_loop(setup):
    engine, kernel, collector_kernel, snaps = setup
    # none yet: the read waits (of the state it came to), the collector is woken
    assert isinstance(engine.read("state.dump", {"stats": True}), Pinned)
    for type_, body in [("state.dump", {"stats": True}), ("service.get", {"service": "web"}),
                        ("backend.get", {"service": "web", "backend": "a"}),
                        ("metrics.rows", {})] * 3:
        reply = read_when_ready(engine, snaps, type_, body)
        assert reply["ok"], reply
    view = engine.read("service.get", {"service": "web"})["data"]
    assert view["kernel"]["scheduler"] == "wrr"
    assert view["backends"]["a"]["kernel"]["weight"] == 100
    assert kernel.counts == {"dump": 0, "service": 0}  # the loop's kernel was never asked
    assert collector_kernel.counts["dump"] >= 1


def test_a_read_after_a_write_waits_for_a_snapshot_taken_after_it(setup):
    engine, kernel, collector_kernel, snaps = setup
    read_when_ready(engine, snaps, "state.dump", {"stats": True})
    [(reply, _)] = engine.handle_batch([("backend.update", {"service": "web", "backend": "a",
                                                            "weight": 9})])
    assert reply == OK
    assert isinstance(engine.read("backend.get", {"service": "web", "backend": "a"}), Pinned)
    view = read_when_ready(engine, snaps, "backend.get", {"service": "web", "backend": "a"})
    assert view["data"]["kernel"]["weight"] == 9  # not the earlier snapshot's 100
    assert kernel.counts["service"] == 0


def test_a_read_after_a_write_has_the_collector_dump_that_service_alone():
    kernel = CountingKernel()
    Engine({}, kernel, lambda s: None).handle_batch([svc_create(), be_create()])
    mine, theirs = socket.socketpair()
    collector = Collector(theirs, lambda: kernel, interval=3600)
    thread = threading.Thread(target=collector.run, daemon=True)
    thread.start()
    skey = next(iter(kernel.dump()))
    kernel.counts["dump"] = 0
    send_frame(mine, {"v": 1, "type": "wake", "after": time.monotonic(), "service": list(skey)})
    reader = FrameReader(mine)
    mine.setblocking(False)
    frames: list[bytes] = []
    wait_until(lambda: frames.extend(reader.read()[0]) or frames, 10, "the service's entry",
               every=0.005)
    msg = msgspec.msgpack.decode(frames[0])
    assert (msg["type"], tuple(msg["service"])) == ("service", skey)
    view, dests = msg["entry"]
    assert view["scheduler"] == "wrr" and len(msgspec.msgpack.decode(dests)) == 1
    assert kernel.counts == {"dump": 0, "service": 1}  # no whole table dumped
    send_frame(mine, {"v": 1, "type": "stop"})
    thread.join(timeout=5)


def test_a_first_read_after_a_restart_is_answered(setup):
    engine, kernel, collector_kernel, snaps = setup
    engine.committed_at.clear()  # as after a restart: no commit since the writer started
    reply = read_when_ready(engine, snaps, "backend.get", {"service": "web", "backend": "a"})
    assert reply["data"]["kernel"]["weight"] == 100


def test_counters_of_a_service_dumped_alone_are_refreshed(setup):
    engine, kernel, collector_kernel, snaps = setup
    read_when_ready(engine, snaps, "backend.get", {"service": "web", "backend": "a"})
    key = next(iter(kernel.dump()))
    next(iter(kernel.table[key].dests.values())).stats = {"conns": 30}  # traffic came
    wait_until(lambda: read_when_ready(engine, snaps, "backend.get", {
        "service": "web", "backend": "a"})["data"]["kernel"]["stats"] == {"conns": 30},
        10, "the counters of a later snapshot")


def test_metrics_columns_follow_a_new_layout_at_once(setup):
    engine, kernel, collector_kernel, snaps = setup
    read_when_ready(engine, snaps, "metrics.rows", {})
    [(reply, _)] = engine.handle_batch([be_create(rs="b", host="10.1.0.2")])
    assert reply == OK
    dumps = collector_kernel.counts["dump"]
    collector_kernel.gate.clear()  # no new dump: the last table's columns for the new rows
    rows = read_when_ready(engine, snaps, "metrics.rows", {})["data"]
    assert collector_kernel.counts["dump"] == dumps
    collector_kernel.gate.set()
    assert len(rows["labels"]["backends"]) == 2


def test_an_idle_collector_stops_dumping(setup):
    engine, kernel, collector_kernel, snaps = setup
    read_when_ready(engine, snaps, "metrics.rows", {})
    time.sleep(INTERVAL * (IDLE_AFTER + 5))
    done = collector_kernel.counts["dump"]
    time.sleep(INTERVAL * 5)
    assert collector_kernel.counts["dump"] == done
    assert isinstance(engine.read("metrics.rows", {}), Pinned)  # stale now: wakes the collector
    assert read_when_ready(engine, snaps, "metrics.rows", {})["ok"]


@pytest.fixture
def loop(setup, tmp_path):
    engine, kernel, collector_kernel, snaps = setup
    ctx = zmq.Context()
    rundir = str(tmp_path / "run")
    runtime.ensure_runtime_dir(rundir)
    loop = WriterLoop(engine, ctx, rundir, reconcile_interval=3600, read_deadline=1.0)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    client = RequestClient(ctx, runtime.endpoint(rundir, runtime.WRITER), "test", timeout=limit(10))
    yield loop, client, collector_kernel, snaps
    loop.running = False
    thread.join(timeout=5)
    client.close()
    loop.close()
    ctx.term()


def test_the_loop_answers_a_waiting_read_when_its_snapshot_arrives(loop):
    loop, client, collector_kernel, snaps = loop
    reply = client.request("service.get", {"service": "web"})
    assert reply["ok"] and reply["data"]["kernel"] is not None
    reply = client.request("backend.update", {"service": "web", "backend": "a", "weight": 7})
    assert reply["ok"]
    reply = client.request("backend.get", {"service": "web", "backend": "a"})
    assert reply["data"]["kernel"]["weight"] == 7


def test_a_waiting_read_is_answered_of_the_state_it_came_to(loop):
    loop, client, collector_kernel, snaps = loop
    ids = [client.send("backend.update", {"service": "web", "backend": "a", "weight": 3}),
           client.send("backend.get", {"service": "web", "backend": "a"}),  # waits: a snapshot
           client.send("backend.delete", {"service": "web", "backend": "a"})]
    replies = [client.recv_reply(i) for i in ids]
    assert replies[0]["ok"] and replies[2]["ok"]
    assert replies[1]["data"]["weight"] == 3  # not the deletion that came after it


def test_a_read_fails_with_a_json_error_when_no_snapshot_comes(loop):
    loop, client, collector_kernel, snaps = loop
    assert client.request("metrics.rows", {})["ok"]
    collector_kernel.gate.clear()  # the collector's kernel stops answering
    assert client.request("backend.update", {"service": "web", "backend": "a",
                                             "weight": 5})["ok"]  # writes go on
    reply = client.request("backend.get", {"service": "web", "backend": "a"})
    assert not reply["ok"] and reply["errno"] == "kernel", reply
    assert "no statistics snapshot" in reply["reason"]
    collector_kernel.gate.set()
    reply = client.request("backend.get", {"service": "web", "backend": "a"})
    assert reply["ok"] and reply["data"]["kernel"]["weight"] == 5


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_collector_that_dies_is_started_again(loop, caplog):
    loop, client, collector_kernel, snaps = loop
    assert client.request("metrics.rows", {})["ok"]
    collector_kernel.die = True
    assert client.request("backend.update", {"service": "web", "backend": "a",
                                             "weight": 4})["ok"]
    first = client.request("backend.get", {"service": "web", "backend": "a"})
    assert not first["ok"]  # its collector died: no snapshot within the deadline
    collector_kernel.die = False
    wait_until(lambda: client.request("backend.get", {"service": "web", "backend": "a"})["ok"],
               10, "a new collector's snapshot")
    assert "the collector exited" in caplog.text
