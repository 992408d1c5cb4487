"""The writer's loop over real ZeroMQ ipc:// sockets: a ``WriterLoop`` in a thread, an ``Engine`` on a
fake kernel persisting to a real state file, driven by ``RequestClient`` and watched by a
``Subscriber`` on the events endpoint."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from gorb.common import messages, runtime
from gorb.common.envelope import Envelope, decode, encode
from gorb.common.transport import RequestClient, Subscriber
from gorb.services.ipvs_writer import state
from gorb.services.ipvs_writer.engine import desired_table
from gorb.services.ipvs_writer.loop import SRC
from tests.pace import limit, wait_until
from tests.service.writer_thread import WriterThread

pytestmark = pytest.mark.timeout(30)

from tests.unit.test_engine import OK  # noqa: E402  (a mutation's data is its change)
NOT_FOUND = {"ok": False, "errno": "not_found", "reason": "unable to locate specified object",
             "data": None}
WEB_KEY = (2, 6, "10.0.0.1", 80, 0)


class Writer(WriterThread):
    """One writer process's objects, with the loop run in a thread."""

    def __init__(self, rundir: str, state_file: Path, reconcile_interval: float = 3600.0):
        super().__init__(rundir, state_file, reconcile_interval=reconcile_interval)


@pytest.fixture
def rundir():
    # pytest's tmp_path can exceed the 107-byte unix socket path limit.
    d = tempfile.mkdtemp(prefix="gorb-", dir="/tmp")
    yield runtime.ensure_runtime_dir(os.path.join(d, "run"), 0o700)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def writer(rundir, tmp_path):
    w = Writer(str(rundir), tmp_path / "state.json")
    yield w
    w.stop()


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


@pytest.fixture
def client(ctx, rundir, writer):
    with RequestClient(ctx, runtime.endpoint(rundir, runtime.WRITER), "test",
                       timeout=limit(5.0)) as c:
        yield c


@pytest.fixture
def sub(ctx, rundir, writer):
    with Subscriber(ctx, runtime.endpoint(rundir, runtime.EVENTS)) as s:
        yield s


def svc(vs="web", host="10.0.0.1", port=80, **opts):
    return {"service": vs, "options": {"host": host, "port": port, **opts}}


def be(vs="web", rs="a", host="10.1.0.1", port=8080, **opts):
    return {"service": vs, "backend": rs, "options": {"host": host, "port": port, **opts}}


def wait_for_subscription(client: RequestClient, sub: Subscriber) -> None:
    """PUB/SUB slow joiner: until the SUB's subscription reaches the PUB, events are dropped.
    Touch a probe service until one of its events arrives (bounded); tests ignore its topics."""
    assert client.request("service.create", svc("probe", "10.255.0.1")) == OK

    def probed() -> bool:
        assert client.request("service.update", {"service": "probe", "options": {}}) == OK
        got = sub.recv(timeout=0.05)
        return got is not None and got[0].startswith("service.probe.")
    wait_until(probed, 5, "a probe event through the subscription", every=0)


def collect(sub: Subscriber, n: int, seconds: float = 5.0) -> list[tuple[str, Envelope]]:
    """The next ``n`` events that are not the probe's nor pulse's re-pull hints; ``n == 0``:
    none within ``seconds`` (a window, not a limit)."""
    out: list[tuple[str, Envelope]] = []

    def arrived() -> bool:
        got = sub.recv(timeout=0.05)
        if got is not None and not got[0].startswith(("service.probe.", "pulse.")):
            out.append(got)
        return len(out) >= n
    if n:
        wait_until(arrived, seconds, lambda: f"{n} event(s) (got {[t for t, _ in out]})", every=0)
    else:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            arrived()
    return out


# --- request / reply ----------------------------------------------------------------------------

def test_every_request_type_over_the_bus(writer, client):
    script = [
        ("service.create", svc(), OK),
        ("backend.create", be(), OK),
        ("backend.update", {"service": "web", "backend": "a", "weight": 0}, OK),
        ("service.update", {"service": "web", "options": {"method": "rr"}}, OK),
        ("service.list", {}, {**OK, "data": {"services": ["web"]}}),
        ("service.get", {"service": "web"}, None),
        ("backend.get", {"service": "web", "backend": "a"}, None),
        ("state.dump", {}, None),
        ("metrics.rows", {}, None),
        ("pulse.targets", {"worker": 0, "workers": 1}, None),
        ("writer.latency", {}, None),
        ("backend.delete", {"service": "web", "backend": "a"}, OK),
        ("backend.get", {"service": "web", "backend": "a"}, NOT_FOUND),
        ("service.delete", {"service": "web"}, OK),
        ("service.get", {"service": "web"}, NOT_FOUND),
    ]
    assert {t for t, _, _ in script} == set(messages.REQUESTS)
    replies = {}
    for type_, body, want in script:
        reply = client.request(type_, body)
        if want is not None:
            assert reply == want, (type_, body)
        else:
            assert (reply["ok"], reply["errno"], reply["reason"]) == (True, "ok", ""), type_
            replies[type_] = reply["data"]
    # The reads ran against the state as the mutations before them left it.
    assert replies["service.get"]["options"]["method"] == "rr"
    assert replies["service.get"]["kernel"]["scheduler"] == "rr"
    assert replies["backend.get"]["options"]["weight"] == 0
    assert replies["backend.get"]["kernel"]["weight"] == 0
    assert set(replies["state.dump"]["services"]) == {"web"}
    assert replies["metrics.rows"]["labels"]["services"] == [["web", "10.0.0.1", "80", "tcp"]]
    (target,) = replies["pulse.targets"]["targets"]  # the default pulse: tcp to the backend
    assert (target["type"], target["port"], target["status"]) == ("tcp", 8080, "unknown")
    assert writer.kernel.snapshot() == {}
    assert state.load(writer.state_file) == {}


def test_pipelined_reads_see_the_mutations_sent_before_them(writer, client):
    assert client.request("service.create", svc()) == OK
    ids = [
        client.send("backend.create", be(rs="b1")),
        client.send("backend.get", {"service": "web", "backend": "b1"}),
        client.send("backend.delete", {"service": "web", "backend": "b1"}),
        client.send("backend.get", {"service": "web", "backend": "b1"}),
        client.send("service.list", {}),
    ]
    replies = [client.recv_reply(i) for i in reversed(ids)][::-1]
    assert replies[0] == OK
    assert replies[1]["ok"] and replies[1]["data"]["backend"] == "b1"
    assert replies[2] == OK
    assert replies[3] == NOT_FOUND
    assert replies[4]["data"] == {"services": ["web"]}


@pytest.mark.parametrize("type_, body", [
    ("service.explode", {"service": "web"}),           # unknown type
    ("service.get.reply", {}),                         # a reply is not a request
    ("service.create", {"service": "web"}),            # mutation, required field missing
    ("service.create", {"service": "web", "options": {"port": "80"}}),  # wrong type inside
    ("backend.update", {"service": "web", "backend": "a", "weight": "heavy"}),
    ("service.get", {"service": "web", "extra": 1}),   # read, unknown field
    ("state.dump", {"services": []}),
])
def test_bad_requests_get_invalid_and_the_loop_keeps_serving(writer, client, type_, body):
    reply = client.request(type_, body)
    assert (reply["ok"], reply["errno"], reply["data"]) == (False, "invalid", None)
    assert reply["reason"]
    assert client.request("service.create", svc()) == OK
    assert client.request("service.list", {}) == {**OK, "data": {"services": ["web"]}}
    assert writer.thread.is_alive()


def test_garbage_from_a_raw_dealer_does_not_stop_the_loop(writer, client, ctx, rundir):
    ep = runtime.endpoint(rundir, runtime.WRITER)
    garbage = [
        [b"\xc1garbage"],
        [b"\x93\x01\x02\x03"],  # msgpack, but a list
        [b"two", b"frames"],
        [msgpack.packb({"v": 2, "type": "service.list", "id": "x", "src": "t", "body": {}})],
        [msgpack.packb({"v": 1, "type": "service.list", "id": "x", "src": "t", "body": []})],
        [b""],
    ]
    with ctx.socket(zmq.DEALER) as raw:
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(ep)
        for frames in garbage:
            raw.send_multipart(frames)
        # The same peer then asks properly and gets a proper reply.
        raw.send(encode(Envelope.new("service.list", {}, "raw", id="raw-1")))
        assert raw.poll(int(limit(5) * 1000))
        reply = decode(raw.recv())
    assert (reply.type, reply.id, reply.src) == ("service.list.reply", "raw-1", SRC)
    assert reply.body == {**OK, "data": {"services": []}}
    def counted() -> bool:
        assert client.request("service.list", {})["ok"]
        return writer.loop.router.bad_messages >= len(garbage)
    wait_until(counted, 5, "the garbage counted", every=0)
    assert writer.loop.router.bad_messages == len(garbage)
    assert client.request("service.create", svc()) == OK
    assert writer.thread.is_alive()


# --- group commit over the bus ------------------------------------------------------------------

def test_500_pipelined_creates_are_group_committed(writer, client):
    assert client.request("service.create", svc()) == OK
    applies_before = len(writer.kernel.applied)
    ids = [client.send("backend.create", be(rs=f"b{i}", host=f"10.1.{i // 250}.{i % 250 + 1}"))
           for i in range(500)]
    replies = [client.recv_reply(i) for i in ids]
    assert replies == [OK] * 500
    applies = len(writer.kernel.applied) - applies_before
    assert 1 <= applies <= 50, f"{applies} kernel batches for 500 requests"
    assert len(writer.engine.services["web"].backends) == 500
    assert writer.kernel.snapshot() == desired_table(writer.engine.services)
    assert state.load(writer.state_file) == writer.engine.services


def test_a_kernel_failure_in_a_pipelined_batch_fails_only_its_request(writer, client):
    assert client.request("service.create", svc()) == OK
    reqs = [("backend.create", be(rs=f"b{i}", host=f"10.1.0.{i + 1}")) for i in range(20)]
    reqs.insert(10, ("service.create", svc("bad", "10.0.0.66", method="nosuch")))
    ids = [client.send(t, b) for t, b in reqs]
    replies = [client.recv_reply(i) for i in ids]
    assert replies[10]["errno"] == "kernel"
    assert replies[10]["reason"].startswith("error while calling into IPVS: add_service")
    assert [r for i, r in enumerate(replies) if i != 10] == [OK] * 20
    assert set(writer.engine.services) == {"web"}
    assert writer.kernel.snapshot() == desired_table(writer.engine.services)
    assert state.load(writer.state_file) == writer.engine.services


# --- events -------------------------------------------------------------------------------------

def test_events_arrive_with_their_topics(writer, client, sub):
    wait_for_subscription(client, sub)
    script = [
        ("service.create", svc(), "service.web.created"),
        ("service.create", svc(), None),  # refused: no event
        ("backend.create", be(), "backend.web.a.created"),
        ("backend.update", {"service": "web", "backend": "a", "weight": 0}, "backend.web.a.updated"),
        ("service.update", {"service": "web", "options": {"method": "rr"}}, "service.web.updated"),
        ("backend.delete", {"service": "web", "backend": "a"}, "backend.web.a.deleted"),
        ("service.get", {"service": "web"}, None),  # reads publish nothing
        ("service.delete", {"service": "web"}, "service.web.deleted"),
    ]
    for type_, body, _ in script:
        client.request(type_, body)
    want = [topic for _, _, topic in script if topic]
    got = collect(sub, len(want))
    assert [t for t, _ in got] == want
    assert [env.type for _, env in got] == [
        "service.created", "backend.created", "backend.updated", "service.updated",
        "backend.deleted", "service.deleted"]
    assert all(env.src == SRC for _, env in got)
    assert got[1][1].body["address"] == "10.1.0.1"
    assert got[-1][1].body == {"service": "web"}
    # nothing more (in particular, not for the refusal) but pulse's re-pull hints
    extra = [sub.recv(timeout=0.05) for _ in range(3)]
    assert all(e is None or e[0] == "pulse.targets.changed" for e in extra), extra


def test_prefix_subscribers_see_only_their_topics(writer, client, ctx, rundir):
    ep = runtime.endpoint(rundir, runtime.EVENTS)
    with Subscriber(ctx, ep, ("backend.web.", "service.probe.")) as narrow:
        wait_for_subscription(client, narrow)
        assert client.request("service.create", svc()) == OK
        assert client.request("service.create", svc("api", "10.0.0.2")) == OK
        assert client.request("backend.create", be("api", "x")) == OK
        assert client.request("backend.create", be()) == OK
        [(topic, _)] = collect(narrow, 1)
        assert topic == "backend.web.a.created"
        assert collect(narrow, 0, 0.1) == []


def test_pipelined_events_all_arrive_in_order(writer, client, sub):
    wait_for_subscription(client, sub)
    assert client.request("service.create", svc()) == OK
    ids = [client.send("backend.create", be(rs=f"b{i}", host=f"10.1.0.{i + 1}"))
           for i in range(200)]
    assert [client.recv_reply(i) for i in ids] == [OK] * 200
    got = collect(sub, 201)
    assert [t for t, _ in got] == (["service.web.created"]
                                   + [f"backend.web.b{i}.created" for i in range(200)])


def test_reconcile_repairs_a_hand_edit_and_says_so(rundir, tmp_path, ctx):
    w = Writer(str(rundir), tmp_path / "state.json", reconcile_interval=0.05)
    try:
        ep = runtime.endpoint(rundir, runtime.WRITER)
        with RequestClient(ctx, ep, "test") as c, \
                Subscriber(ctx, runtime.endpoint(rundir, runtime.EVENTS)) as s:
            wait_for_subscription(c, s)
            assert c.request("service.create", svc()) == OK
            assert c.request("backend.create", be()) == OK
            w.kernel.edit(lambda table: table[WEB_KEY].dests.clear())
            def reconciled() -> Envelope | None:
                ev = s.recv(timeout=0.05)
                return ev[1] if ev is not None and ev[0] == "writer.reconciled" else None
            got = wait_until(reconciled, 5, "a writer.reconciled event", every=0)
            assert got.body == {"repaired": 1, "errors": []}
            assert WEB_KEY in w.kernel.snapshot()
            assert set(w.kernel.snapshot()[WEB_KEY].dests) == {("10.1.0.1", 8080)}
    finally:
        w.stop()


def test_a_restarted_writer_serves_the_persisted_state(rundir, tmp_path, ctx):
    path = tmp_path / "state.json"
    w = Writer(str(rundir), path)
    try:
        with RequestClient(ctx, runtime.endpoint(rundir, runtime.WRITER), "test") as c:
            assert c.request("service.create", svc()) == OK
            assert c.request("backend.create", be()) == OK
    finally:
        w.stop()
    w2 = Writer(str(rundir), path)  # a fresh (empty) kernel: start converges it to the file
    try:
        assert w2.kernel.snapshot() == desired_table(w2.engine.services)
        with RequestClient(ctx, runtime.endpoint(rundir, runtime.WRITER), "test") as c:
            reply = c.request("backend.get", {"service": "web", "backend": "a"})
            assert reply["ok"] and reply["data"]["kernel"]["weight"] == 100
    finally:
        w2.stop()


def test_the_writer_reports_its_own_commit_latency(writer, client):
    assert client.request("writer.latency", {"clear": True})["ok"]
    assert client.request("service.create", svc()) == OK
    assert client.request("backend.create", be()) == OK
    seconds = client.request("writer.latency", {})["data"]["seconds"]
    assert len(seconds) == 2 and all(0 < s < limit(5) for s in seconds)
    assert client.request("writer.latency", {"clear": True})["data"]["seconds"] == seconds
    assert client.request("writer.latency", {})["data"]["seconds"] == []
    bad = client.request("writer.latency", {"clear": 1})
    assert bad["ok"] is False and bad["errno"] == "invalid"
