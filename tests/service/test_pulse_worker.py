"""Pulse end to end on one machine: a ``WriterLoop`` in a thread (``FakeKernel`` at the kernel
edge, a real state file), real ``python -m gorb.services.pulse_worker`` processes over ipc://, and
backends that are real TCP listeners on 127.0.0.1 which the tests close and reopen.

What is checked is what an operator would see in the kernel table: the weight of each dest
(``FakeKernel.table``) and every op the writer applied (``FakeKernel.applied``), plus the writer's
``backend.get`` view. Every wait is ``tests.pace.wait_until``, bounded by a limit scaled to the
machine's pace; the only time-based bound asserted is GORB's "down within interval + timeout"
(as configured, plus a slack that is such a limit).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq

from gorb.common import runtime
from gorb.common.shard import owner
from gorb.common.transport import RequestClient
from tests.pace import limit, wait_until
from tests.service.writer_thread import WriterThread

pytestmark = pytest.mark.timeout(40)

ROOT = Path(__file__).resolve().parents[2]
LO = "127.0.0.1"
INTERVAL, TIMEOUT, JITTER = 1.0, 0.5, 0.1
SLACK = 0.5
PULSE = {"type": "tcp", "interval": "1s", "timeout": "500ms"}
from tests.unit.test_engine import OK  # noqa: E402  (a mutation's data is its change)


# --- real backends ------------------------------------------------------------------------------

class Listener:
    """A TCP listener on loopback that accepts and counts connections in a thread. ``close`` stops
    listening (connects are then refused); ``open`` listens again on the same port."""

    def __init__(self) -> None:
        self.port = 0
        self.accepted = 0
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.open()

    def open(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((LO, self.port))
        s.listen(128)
        s.settimeout(0.05)  # accept returns at once on a connection; the timeout bounds a stop
        self.port = s.getsockname()[1]
        self._sock = s
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, args=(s,), daemon=True,
                                        name=f"listener-{self.port}")
        self._thread.start()

    def _serve(self, s: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = s.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1  # only this thread writes it
            conn.close()

    def close(self) -> None:
        if self._sock is None:
            return
        self._stop.set()
        self._thread.join(limit(2))
        self._sock.close()
        self._sock = None


class DeadPort:
    """A loopback port that refuses connections: bound (nobody else takes it), never listening."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((LO, 0))
        self.port = self._sock.getsockname()[1]

    def close(self) -> None:
        self._sock.close()


# --- the writer, in a thread --------------------------------------------------------------------

class Writer(WriterThread):
    """One writer process's objects over a fresh ``FakeKernel``, the loop run in a thread."""

    def __init__(self, rundir: str, state_file: Path):
        super().__init__(rundir, state_file)

    def weight(self, vip: str, port: int) -> int | None:
        """The kernel weight of the dest 127.0.0.1:``port`` of the service ``vip``:80."""
        svc = self.kernel.snapshot().get((2, 6, vip, 80, 0))
        dest = None if svc is None else svc.dests.get((LO, port))
        return None if dest is None else dest.weight

    def weights(self) -> dict:
        return {(k, d): dest.weight for k, svc in self.kernel.snapshot().items()
                for d, dest in svc.dests.items()}

    def weight_ops(self, since: int) -> list:
        """The ``set_dest`` ops (weight changes) applied since batch number ``since``."""
        return [op for batch in self.kernel.applied[since:] for op in batch
                if op.verb == "set_dest"]


# --- pulse-worker processes ---------------------------------------------------------------------

class Workers:
    """``python -m gorb.services.pulse_worker`` processes started by this test (and only those)."""

    def __init__(self, rundir: str, logdir: Path):
        self.rundir, self.logdir = rundir, logdir
        self.procs: dict[int, subprocess.Popen] = {}
        self.logs: dict[int, Path] = {}
        self._n = 0
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("GORB_")}

    def start(self, index: int, count: int) -> subprocess.Popen:
        assert index not in self.procs, f"worker {index} is running"
        self._n += 1
        log = self.logdir / f"worker-{index}-of-{count}-{self._n}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gorb.services.pulse_worker", "--config", os.devnull,
                 "--runtime-dir", self.rundir,
                 "--index", str(index), "--workers", str(count)],
                cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT)
        self.procs[index], self.logs[index] = proc, log
        return proc

    def stop(self, index: int, sig: int = signal.SIGTERM) -> int:
        proc = self.procs.pop(index)
        proc.send_signal(sig)
        return proc.wait(limit(5))

    def stop_all(self) -> dict[int, int]:
        return {i: self.stop(i) for i in list(self.procs)}

    def log(self, index: int) -> str:
        return self.logs[index].read_text(errors="replace")


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture
def tmpdir_short():
    # pytest's tmp_path can exceed the 107-byte unix socket path limit.
    d = tempfile.mkdtemp(prefix="gorb-pulse-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


class Bus:
    """A writer, a client and the workers of one test; torn down in reverse."""

    def __init__(self, base: Path):
        self.base = base
        self.rundir = str(runtime.ensure_runtime_dir(base / "run", 0o700))
        self.state_file = base / "state.json"
        self.writer = Writer(self.rundir, self.state_file)
        self.ctx = zmq.Context()
        self.client = RequestClient(self.ctx, runtime.endpoint(self.rundir, runtime.WRITER),
                                    "test", timeout=limit(5.0))
        self.workers = Workers(self.rundir, base)

    def restart_writer(self) -> Writer:
        self.writer.stop()
        self.writer = Writer(self.rundir, self.state_file)
        return self.writer

    def request(self, type_: str, body: dict) -> dict:
        return self.client.request(type_, body)

    def must(self, type_: str, body: dict) -> Any:
        reply = self.request(type_, body)
        assert reply["ok"], (type_, body, reply)
        return reply["data"]

    def service(self, vs: str, vip: str, **opts) -> None:
        self.must("service.create", {"service": vs,
                                     "options": {"host": vip, "port": 80, **opts}})

    def backend(self, vs: str, rs: str, port: int, **opts) -> None:
        self.must("backend.create", {"service": vs, "backend": rs,
                                     "options": {"host": LO, "port": port, **opts}})

    def view(self, vs: str, rs: str) -> dict:
        return self.must("backend.get", {"service": vs, "backend": rs})

    def targets(self, worker: int, workers: int) -> list[dict]:
        return self.must("pulse.targets", {"worker": worker, "workers": workers})["targets"]

    def close(self) -> dict[int, int]:
        codes = self.workers.stop_all()
        self.client.close()
        self.ctx.destroy(linger=0)
        self.writer.stop()
        return codes


@pytest.fixture
def bus(tmpdir_short):
    b = Bus(tmpdir_short)
    yield b
    codes = b.close()
    # SIGTERM ends a worker cleanly (exit 0), not as a crash (70).
    assert all(rc == 0 for rc in codes.values()), codes


@pytest.fixture
def listeners():
    made: list = []

    def make(kind=Listener):
        made.append(kind())
        return made[-1]
    yield make
    for lis in made:
        lis.close()


def status_is(bus: Bus, vs: str, rs: str, status: str) -> Callable[[], dict | None]:
    def probe():
        v = bus.view(vs, rs)
        return v if v["check"] is not None and v["health"]["status"] == status else None
    return probe


# The first check of a new target comes within one interval; allow a couple of intervals for
# process start and the first pull.
SETTLE = 3 * INTERVAL + 3.0


# --- one worker: down, back up in slow-start steps -----------------------------------------------

def test_a_closed_listener_is_weight_0_within_interval_plus_timeout_and_climbs_back(bus, listeners):
    lis = listeners()
    bus.service("web", "10.0.0.1", pulse={**PULSE, "slow_start": 4, "backoff_max": "0s"})
    bus.backend("web", "a", lis.port, weight=100)
    bus.workers.start(0, 1)

    up = wait_until(status_is(bus, "web", "a", "up"), SETTLE, "the backend up")
    assert bus.writer.weight("10.0.0.1", lis.port) == 100
    assert up["weight"] == 100 and up["kernel"]["weight"] == 100
    assert up["health"]["held_in"] is False
    check = up["check"]
    assert (check["ok"], check["status"], check["error"]) == (True, "up", "")
    assert 0 < check["latency"] < TIMEOUT
    assert check["passes"] >= 1 and check["failures"] == 0 and check["health"] == 1.0

    lis.close()
    wait_until(lambda: bus.writer.weight("10.0.0.1", lis.port) == 0, SLACK, "weight 0",
               fixed=INTERVAL * (1 + JITTER) + TIMEOUT)
    down = bus.view("web", "a")
    assert down["weight"] == 0 and down["kernel"]["weight"] == 0
    assert down["health"]["status"] == "down" and down["health"]["level"] == 0.0
    check = down["check"]
    assert (check["ok"], check["status"]) == (False, "down")
    assert "connection refused" in check["error"]
    assert check["failures"] >= 1 and check["passes"] == 0 and check["health"] < 1.0

    mark = len(bus.writer.kernel.applied)
    lis.open()
    wait_until(lambda: bus.writer.weight("10.0.0.1", lis.port) == 100,
               4 * INTERVAL * (1 + JITTER) + 3.0, "full weight again")
    steps = [op.dest.weight for op in bus.writer.weight_ops(mark)]
    assert steps == [25, 50, 75, 100]
    back = bus.view("web", "a")
    assert back["health"]["status"] == "up" and back["health"]["level"] == 1.0
    assert back["check"]["ok"] is True and back["check"]["passes"] >= 4


def test_fail_open_holds_the_backend_that_failed_last_and_says_so(bus, listeners, caplog):
    caplog.set_level(logging.WARNING, logger="gorb.services.ipvs_writer.engine")
    l1, l2 = listeners(), listeners()
    bus.service("fo", "10.0.0.2", fail_open=0.5, pulse={**PULSE, "backoff_max": "0s"})
    bus.backend("fo", "b1", l1.port)
    bus.backend("fo", "b2", l2.port)
    mark = len(bus.writer.kernel.applied)
    bus.workers.start(0, 1)
    for rs in ("b1", "b2"):
        wait_until(status_is(bus, "fo", rs, "up"), SETTLE, f"{rs} up")

    l1.close()
    wait_until(lambda: bus.writer.weight("10.0.0.2", l1.port) == 0, SETTLE, "b1 at 0")
    l2.close()
    v2 = wait_until(status_is(bus, "fo", "b2", "down"), SETTLE, "b2 down")
    assert v2["weight"] == 100 and v2["health"]["held_in"] is True
    assert v2["kernel"]["weight"] == 100 and bus.writer.weight("10.0.0.2", l2.port) == 100
    v1 = bus.view("fo", "b1")
    assert v1["health"]["status"] == "down" and v1["health"]["held_in"] is False
    assert v1["weight"] == 0 and bus.writer.weight("10.0.0.2", l1.port) == 0
    # b2 never left the kernel's rotation; b1 was taken out exactly once.
    ops = bus.writer.weight_ops(mark)
    assert [(op.dest.port, op.dest.weight) for op in ops] == [(l1.port, 0)]
    held = [r.getMessage() for r in caplog.records if "fail-open" in r.getMessage()]
    assert held and "service fo" in held[0] and "(b2)" in held[0], held


def test_a_manual_drain_stays_0_while_the_check_passes(bus, listeners):
    lis = listeners()
    bus.service("dr", "10.0.0.3", pulse=PULSE)
    bus.backend("dr", "a", lis.port)
    bus.workers.start(0, 1)
    wait_until(status_is(bus, "dr", "a", "up"), SETTLE, "up")

    assert bus.request("backend.update", {"service": "dr", "backend": "a", "weight": 0}) == OK
    assert bus.writer.weight("10.0.0.3", lis.port) == 0
    mark = len(bus.writer.kernel.applied)
    seen = bus.view("dr", "a")["check"]["checks"]

    def two_more_passes():
        v = bus.view("dr", "a")
        return v if v["check"]["checks"] >= seen + 2 else None
    v = wait_until(two_more_passes, 2 * INTERVAL * (1 + JITTER) + 2.0, "two more checks")
    assert v["check"]["ok"] is True and v["health"]["status"] == "up"
    assert v["weight"] == 0 and v["kernel"]["weight"] == 0
    assert bus.writer.weight_ops(mark) == []

    assert bus.request("backend.update", {"service": "dr", "backend": "a", "weight": 100}) == OK
    assert bus.writer.weight("10.0.0.3", lis.port) == 100
    assert bus.view("dr", "a")["weight"] == 100


def test_the_same_target_under_two_services_is_checked_once(bus, listeners):
    lis = listeners()
    for vs, vip in (("s1", "10.0.0.4"), ("s2", "10.0.0.5")):
        bus.service(vs, vip, pulse=PULSE)
        bus.backend(vs, "a", lis.port)
    (target,) = bus.targets(0, 1)
    assert (target["address"], target["port"]) == (LO, lis.port)
    bus.workers.start(0, 1)

    def checked(n):
        def probe():
            v = bus.view("s1", "a")
            return v if v["check"] is not None and v["check"]["checks"] >= n else None
        return probe
    first = wait_until(checked(1), SETTLE, "a first check")["check"]["checks"]
    base = lis.accepted
    v = wait_until(checked(first + 3), 3 * INTERVAL * (1 + JITTER) + 2.0, "three more checks")
    checks = v["check"]["checks"] - first
    accepted = lis.accepted - base
    # One connection per check (give or take the one in flight), not one per service.
    assert checks - 1 <= accepted <= checks + 1, (checks, accepted)
    assert bus.view("s2", "a")["check"]["key"] == v["check"]["key"]
    for vs, vip in (("s1", "10.0.0.4"), ("s2", "10.0.0.5")):
        assert bus.writer.weight(vip, lis.port) == 100


# --- several workers: shards, restarts, rebalancing ----------------------------------------------

SH_VIP = "10.0.0.6"


class Fleet:
    """Service ``sh``: up backends on listeners and one down backend (``down``, on a dead port,
    ``fall`` 2 so that an unseeded tracker would report ``unknown`` after its first failure),
    with enough up backends that every shard of every worker count in ``counts`` has one."""

    def __init__(self, bus: Bus, listeners, counts: tuple[int, ...]):
        self.bus = bus
        bus.service("sh", SH_VIP, pulse=PULSE)
        dead = listeners(DeadPort)
        bus.backend("sh", "down", dead.port, pulse={"fall": 2})
        self.ports = {"down": dead.port}
        for i in range(40):
            keys = [t["key"] for t in bus.targets(0, 1) if t["port"] != dead.port]
            if all({owner(k, n) for k in keys} == set(range(n)) for n in counts):
                break
            lis = listeners()
            bus.backend("sh", f"up{i}", lis.port)
            self.ports[f"up{i}"] = lis.port
        else:
            pytest.fail("could not populate every shard")
        self.by_port = {p: rs for rs, p in self.ports.items()}
        self.all_keys = {t["key"]: self.by_port[t["port"]] for t in bus.targets(0, 1)}
        self.down_key = next(k for k, rs in self.all_keys.items() if rs == "down")

    def shard(self, worker: int, workers: int) -> dict[str, dict]:
        return {t["key"]: t for t in self.bus.targets(worker, workers)}

    def settled(self) -> bool:
        for rs in self.ports:
            v = self.bus.view("sh", rs)
            want = "down" if rs == "down" else "up"
            if v["check"] is None or v["health"]["status"] != want:
                return False
        return True

    def checked_since(self, wall: float, rss, down_checks: int, statuses: list) -> bool:
        """Every backend of ``rss`` has a check that ended after ``wall`` (``down``: at least
        ``down_checks`` of them, by its new tracker's count); records down's reported status."""
        for rs in rss:
            check = self.bus.view("sh", rs)["check"]
            if check is None or check["at"] <= wall:
                return False
            if rs == "down":
                statuses.append(check["status"])
                if check["checks"] < down_checks:
                    return False
        return True


def test_two_workers_split_the_targets_and_a_killed_worker_moves_no_weight(bus, listeners):
    fleet = Fleet(bus, listeners, counts=(2,))
    shards = [fleet.shard(i, 2) for i in range(2)]
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) == set(fleet.all_keys)
    assert all(shards), "each worker has targets"
    for i in range(2):
        bus.workers.start(i, 2)
    wait_until(fleet.settled, SETTLE, "every backend settled")
    for i in range(2):
        assert f"worker {i}/2: {len(shards[i])} target(s)" in bus.workers.log(i)

    victim = owner(fleet.down_key, 2)
    seeded = fleet.shard(victim, 2)
    assert seeded[fleet.down_key]["status"] == "down"
    assert {t["status"] for k, t in seeded.items() if k != fleet.down_key} <= {"up"}
    weights, mark = bus.writer.weights(), len(bus.writer.kernel.applied)
    assert weights[((2, 6, SH_VIP, 80, 0), (LO, fleet.ports["down"]))] == 0

    assert bus.workers.stop(victim, signal.SIGKILL) == -signal.SIGKILL
    restarted = time.time()
    bus.workers.start(victim, 2)
    statuses: list[str] = []
    mine = [fleet.all_keys[k] for k in shards[victim]]
    wait_until(lambda: fleet.checked_since(restarted, mine, 2, statuses),
               SETTLE + 2 * INTERVAL, "the restarted worker's checks")
    assert statuses and set(statuses) == {"down"}, statuses  # never "unknown": seeded
    assert bus.writer.weight_ops(mark) == []
    assert bus.writer.weights() == weights


def test_changing_the_worker_count_moves_no_weight(bus, listeners):
    fleet = Fleet(bus, listeners, counts=(2, 3))
    for i in range(2):
        bus.workers.start(i, 2)
    wait_until(fleet.settled, SETTLE, "every backend settled")
    weights, mark = bus.writer.weights(), len(bus.writer.kernel.applied)

    assert bus.workers.stop_all() == {0: 0, 1: 0}
    restarted = time.time()
    shards = [fleet.shard(i, 3) for i in range(3)]
    assert all(shards) and sum(map(len, shards)) == len(fleet.all_keys)
    assert set().union(*shards) == set(fleet.all_keys)
    for i in range(3):
        bus.workers.start(i, 3)
    statuses: list[str] = []
    wait_until(lambda: fleet.checked_since(restarted, fleet.ports, 2, statuses),
               SETTLE + 2 * INTERVAL, "every target checked by the new workers")
    assert set(statuses) == {"down"}, statuses
    assert bus.writer.weight_ops(mark) == []
    assert bus.writer.weights() == weights
    for i in range(3):
        assert f"worker {i}/3: {len(shards[i])} target(s)" in bus.workers.log(i)


# --- the writer restarts -------------------------------------------------------------------------

def test_health_survives_a_writer_restart(bus, listeners):
    lis, dead = listeners(), listeners(DeadPort)
    bus.service("wr", "10.0.0.7", pulse=PULSE)
    bus.backend("wr", "up", lis.port)
    bus.backend("wr", "down", dead.port)
    bus.workers.start(0, 1)
    wait_until(lambda: bus.writer.weight("10.0.0.7", dead.port) == 0, SETTLE, "down at 0")
    wait_until(status_is(bus, "wr", "up", "up"), SETTLE, "up")

    w = bus.restart_writer()  # the worker keeps running and reconnects
    # The converge at start, before the loop takes any result: from the state file alone.
    (first, *_) = w.kernel.applied
    boot = {(op.dest.port, op.dest.weight) for op in first if op.verb == "add_dest"}
    assert boot == {(lis.port, 100), (dead.port, 0)}
    mark = len(w.kernel.applied)
    v = bus.view("wr", "down")
    assert v["health"]["status"] == "down" and v["weight"] == 0

    restarted = time.time()

    def both_reported():
        views = [bus.view("wr", rs) for rs in ("up", "down")]
        return all(v["check"] is not None and v["check"]["at"] > restarted for v in views)
    wait_until(both_reported, SETTLE, "results reach the new writer")
    assert w.weight_ops(mark) == []
    assert w.weight("10.0.0.7", dead.port) == 0 and w.weight("10.0.0.7", lis.port) == 100


# --- a target shared by a backend added later ---------------------------------------------------

def _known_down_target_gets_a_new_member(bus: Bus, listeners) -> DeadPort:
    """s1 (empty, so first in the writer's order) and s2/b on a dead port, down; the worker then
    stopped, and s1/a added on the same dead port: a new member, first of the target's members."""
    dead = listeners(DeadPort)
    bus.service("s1", "10.0.0.8", pulse=PULSE)
    bus.service("s2", "10.0.0.9", pulse=PULSE)
    bus.backend("s2", "b", dead.port)
    bus.workers.start(0, 1)
    wait_until(status_is(bus, "s2", "b", "down"), SETTLE, "s2/b down")
    assert bus.workers.stop(0) == 0
    bus.backend("s1", "a", dead.port)
    return dead


def test_a_new_member_of_a_down_target_does_not_reset_the_seed(bus, listeners):
    dead = _known_down_target_gets_a_new_member(bus, listeners)
    (target,) = bus.targets(0, 1)
    assert target["port"] == dead.port
    assert target["status"] == "down"  # s2/b knows, and s1/a was created with its verdict
    mark = len(bus.writer.kernel.applied)
    bus.workers.start(0, 1)
    wait_until(status_is(bus, "s1", "a", "down"), SETTLE, "s1/a down")
    assert bus.writer.weight("10.0.0.9", dead.port) == 0
    assert bus.writer.weight("10.0.0.8", dead.port) == 0
    assert bus.writer.weight_ops(mark) == []  # nothing flapped when the worker came back


def test_a_new_backend_on_a_target_known_down_starts_at_0(bus, listeners):
    dead = _known_down_target_gets_a_new_member(bus, listeners)
    assert bus.writer.weight("10.0.0.8", dead.port) == 0
