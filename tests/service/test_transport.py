"""The bus over real ZeroMQ ipc:// sockets: request/reply, PUB/SUB, PUSH/PULL, the runtime dir."""

import os
import random
import shutil
import socket
import stat
import tempfile
import threading

import pytest
import zmq

from gorb.common import runtime
from gorb.common.envelope import Envelope, decode, encode
from gorb.common.runtime import RuntimeDirError, endpoint, ensure_runtime_dir
from gorb.common.transport import (
    Publisher,
    Puller,
    Pusher,
    RequestClient,
    RouterServer,
    Subscriber,
    TransportError,
    TransportTimeout,
)
from tests.pace import limit, wait_until

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def tmpdir_short():
    # pytest's tmp_path can exceed the 107-byte unix socket path limit.
    d = tempfile.mkdtemp(prefix="gorb-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def rundir(tmpdir_short):
    return ensure_runtime_dir(os.path.join(tmpdir_short, "run"), 0o700)


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


class ServerThread:
    """Runs ``handler(server, identity, env)`` for each request until stopped."""

    def __init__(self, server, handler):
        self.server = server
        self.handler = handler
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            got = self.server.recv(timeout=0.02)
            if got is not None:
                self.handler(self.server, *got)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(limit(5))
        assert not self.thread.is_alive()


def echo(server, identity, env):
    server.reply(identity, env, {"echo": env.body}, "test-server")


def test_request_reply_round_trip(ctx, rundir):
    ep = endpoint(rundir, runtime.WRITER)
    seen = []

    def handler(server, identity, env):
        seen.append(env)
        echo(server, identity, env)

    with RouterServer(ctx, ep) as server, ServerThread(server, handler), \
            RequestClient(ctx, ep, "api", timeout=limit(2.0)) as client:
        assert client.request("service.create", {"id": "web"}) == {"echo": {"id": "web"}}
    assert seen[0].type == "service.create"
    assert seen[0].src == "api"


def test_reply_type_and_id(ctx, rundir):
    ep = endpoint(rundir, runtime.WRITER)
    with RouterServer(ctx, ep) as server, ctx.socket(zmq.DEALER) as raw:
        raw.connect(ep)
        raw.send(encode(Envelope.new("service.list", {}, "api", id="r-1")))
        identity, env = server.recv(timeout=limit(2.0))
        server.reply(identity, env, {"ok": True}, "ipvs-writer")
        assert raw.poll(int(limit(2) * 1000))
        reply = decode(raw.recv())
    assert (reply.type, reply.id, reply.src, reply.body) == (
        "service.list.reply", "r-1", "ipvs-writer", {"ok": True})


def test_timeout_without_server(ctx, rundir):
    with RequestClient(ctx, endpoint(rundir, runtime.WRITER), "api", timeout=0.05) as client:
        with pytest.raises(TransportTimeout):
            client.request("service.list", {})


def test_timeout_when_server_does_not_answer(ctx, rundir):
    ep = endpoint(rundir, runtime.WRITER)
    with RouterServer(ctx, ep), RequestClient(ctx, ep, "api") as client:
        with pytest.raises(TransportTimeout):
            client.request("service.list", {}, timeout=0.05)
    assert issubclass(TransportTimeout, TransportError)


def test_late_reply_is_stale_and_next_request_gets_its_own(ctx, rundir):
    ep = endpoint(rundir, runtime.WRITER)
    client_gave_up = threading.Event()

    def handler(server, identity, env):
        if env.body["n"] == 1:
            client_gave_up.wait(limit(5))  # answer only after the client timed out
        echo(server, identity, env)

    with RouterServer(ctx, ep) as server, ServerThread(server, handler), \
            RequestClient(ctx, ep, "api", timeout=limit(2.0)) as client:
        with pytest.raises(TransportTimeout):
            client.request("service.get", {"n": 1}, timeout=0.1)
        client_gave_up.set()
        assert client.request("service.get", {"n": 2}) == {"echo": {"n": 2}}
        assert client.stale_replies == 1


def test_pipelining_500_requests(ctx, rundir):
    ep = endpoint(rundir, runtime.WRITER)
    with RouterServer(ctx, ep) as server, ServerThread(server, echo), \
            RequestClient(ctx, ep, "api", timeout=limit(5.0)) as client:
        sent = {client.send("backend.update", {"i": i}): i for i in range(500)}
        ids = list(sent)
        random.Random(1).shuffle(ids)  # collect in an order unrelated to arrival
        for req_id in ids:
            assert client.recv_reply(req_id) == {"echo": {"i": sent[req_id]}}
        assert client.stale_replies == 0


def test_garbage_is_counted_and_server_keeps_serving(ctx, rundir):
    ep = endpoint(rundir, runtime.WRITER)
    with RouterServer(ctx, ep) as server, ctx.socket(zmq.DEALER) as bad, \
            RequestClient(ctx, ep, "api", timeout=limit(2.0)) as client:
        bad.connect(ep)
        bad.send(b"\xc1garbage")
        bad.send(b"\x93\x01\x02\x03")  # msgpack, but a list
        bad.send_multipart([b"two", b"frames"])
        with ServerThread(server, echo):
            # ROUTER fair-queues across peers, so the client's request may overtake the garbage:
            # wait for the count rather than assume an order.
            assert client.request("service.list", {}) == {"echo": {}}
            wait_until(lambda: server.bad_messages >= 3, 2, "the garbage counted", every=0.01)
            assert client.request("service.list", {"again": 1}) == {"echo": {"again": 1}}
        assert server.bad_messages == 3


def test_router_recv_many_drains_without_blocking(ctx, rundir):
    ep = endpoint(rundir, runtime.WRITER)
    with RouterServer(ctx, ep) as server, \
            RequestClient(ctx, ep, "api", timeout=limit(2.0)) as client:
        assert server.recv_many(10) == []
        for i in range(5):
            client.send("service.get", {"i": i})
        got = []

        def drained() -> bool:
            server.socket.poll(100)
            batch = server.recv_many(2)
            assert len(batch) <= 2
            got.extend(batch)
            return len(got) >= 5
        wait_until(drained, 2, "the five requests", every=0)
        assert [env.body["i"] for _, env in got] == list(range(5))


def test_pub_sub_prefix_topics(ctx, rundir):
    ep = endpoint(rundir, runtime.EVENTS)
    with Publisher(ctx, ep, "ipvs-writer") as pub, Subscriber(ctx, ep, ("service.web.",)) as sub:
        # Slow joiner: a subscription takes effect asynchronously, so publish until one arrives.
        def published():
            pub.publish("service.api.created", "service.created", {"id": "api"})
            pub.publish("service.web.created", "service.created", {"id": "web"})
            return sub.recv(timeout=0.02)
        first = wait_until(published, 3, "a first event through the subscription", every=0)
        while sub.recv(timeout=0.05) is not None:  # drain the warm-up duplicates
            pass

        pub.publish("service.webby.created", "service.created", {"id": "webby"})
        pub.publish("service.web.updated", "service.updated", {"id": "web", "n": 1})
        pub.publish("service.api.deleted", "service.deleted", {"id": "api"})
        pub.publish("service.web.deleted", "service.deleted", {"id": "web"})
        got = [sub.recv(timeout=limit(2.0)) for _ in range(2)]
        assert sub.recv(timeout=0.05) is None
    assert first[0] == "service.web.created"
    assert [(topic, env.type, env.body) for topic, env in got] == [
        ("service.web.updated", "service.updated", {"id": "web", "n": 1}),
        ("service.web.deleted", "service.deleted", {"id": "web"}),
    ]
    assert got[0][1].src == "ipvs-writer"


def test_push_pull_recv_many(ctx, rundir):
    ep = endpoint(rundir, runtime.HEALTH)
    with Puller(ctx, ep) as puller, Pusher(ctx, ep, "pulse-worker", timeout=limit(2.0)) as pusher:
        assert puller.recv_many(10) == []
        for i in range(10):
            pusher.send("health.results", {"seq": i})
        got = [puller.recv(timeout=limit(2.0))]

        def drained() -> bool:
            puller.socket.poll(100)
            batch = puller.recv_many(4)
            assert len(batch) <= 4
            got.extend(batch)
            return len(got) >= 10
        wait_until(drained, 2, "the ten results", every=0)
    assert [env.body["seq"] for env in got] == list(range(10))
    assert {env.src for env in got} == {"pulse-worker"}


def test_push_times_out_without_puller(ctx, rundir):
    with Pusher(ctx, endpoint(rundir, runtime.HEALTH), "pulse-worker", timeout=0.05) as pusher:
        with pytest.raises(TransportTimeout):
            pusher.send("health.results", {})


def test_puller_counts_garbage(ctx, rundir):
    ep = endpoint(rundir, runtime.HEALTH)
    with Puller(ctx, ep) as puller, ctx.socket(zmq.PUSH) as raw, \
            Pusher(ctx, ep, "pulse-worker") as pusher:
        raw.connect(ep)
        raw.send(b"junk")
        assert puller.socket.poll(int(limit(2) * 1000))
        pusher.send("health.results", {"ok": 1})
        assert puller.recv(timeout=limit(2.0)).body == {"ok": 1}
    assert puller.bad_messages == 1


# --- runtime dir and socket files -------------------------------------------------------------

@pytest.mark.parametrize("mode", [0o700, 0o770])
def test_runtime_dir_mode_is_exact(tmpdir_short, mode):
    old = os.umask(0o077)  # mkdir alone would not give 0o770 under this umask
    try:
        path = ensure_runtime_dir(os.path.join(tmpdir_short, "a", "run"), mode)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode
    os.chmod(path, 0o750)
    ensure_runtime_dir(path, mode)  # an existing directory is corrected
    assert stat.S_IMODE(os.stat(path).st_mode) == mode


@pytest.mark.parametrize("before, after", [(0o750, 0o750), (0o700, 0o700), (0o755, 0o750),
                                           (0o777, 0o770), (0o2750, 0o750)])
def test_programs_keep_the_launchers_mode_but_never_other(tmpdir_short, before, after):
    """mode=None (what the writer and discovery pass): gorb run chose the mode, a program only
    takes away what "other" (or a set-id bit) would have; a new directory gets 0o770."""
    path = os.path.join(tmpdir_short, "run")
    os.mkdir(path)
    os.chmod(path, before)
    ensure_runtime_dir(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == after
    fresh = ensure_runtime_dir(os.path.join(tmpdir_short, "new"))
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o770


def test_discovery_binds_in_its_own_directory(tmpdir_short):
    from gorb.common import store_messages
    assert store_messages.endpoint(tmpdir_short) == \
        f"ipc://{tmpdir_short}/{runtime.DISCOVERY_DIR}/discovery.sock"


@pytest.mark.parametrize("mode", [0o777, 0o771, 0o704, 0o1770, 0o2770])
def test_runtime_dir_refuses_mode_beyond_owner_and_group(tmpdir_short, mode):
    with pytest.raises(ValueError):
        ensure_runtime_dir(os.path.join(tmpdir_short, "run"), mode)
    assert not os.path.exists(os.path.join(tmpdir_short, "run"))


def test_runtime_dir_refuses_symlink(tmpdir_short):
    target = os.path.join(tmpdir_short, "target")
    os.mkdir(target, 0o755)
    link = os.path.join(tmpdir_short, "run")
    os.symlink(target, link)
    with pytest.raises(RuntimeDirError, match="symlink"):
        ensure_runtime_dir(link, 0o700)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o755


def test_runtime_dir_refuses_file(tmpdir_short):
    path = os.path.join(tmpdir_short, "run")
    open(path, "w").close()
    with pytest.raises(RuntimeDirError, match="not a directory"):
        ensure_runtime_dir(path, 0o700)


def test_endpoint_names_and_length_limit(rundir):
    assert endpoint(rundir, runtime.WRITER) == f"ipc://{rundir}/writer.sock"
    with pytest.raises(ValueError, match="107-byte"):
        endpoint("/tmp/" + "x" * 100, runtime.EVENTS)


def test_bound_socket_file_mode_is_0660(ctx, rundir):
    with RouterServer(ctx, endpoint(rundir, runtime.WRITER)), \
            Publisher(ctx, endpoint(rundir, runtime.EVENTS), "w"), \
            Puller(ctx, endpoint(rundir, runtime.HEALTH)):
        for name in ("writer", "events", "health"):
            st = os.stat(rundir / f"{name}.sock")
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o770


def test_bind_replaces_socket_file_of_dead_process(ctx, rundir):
    path = str(rundir / "writer.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays behind, nobody listens
    ep = endpoint(rundir, runtime.WRITER)
    with RouterServer(ctx, ep) as server, ServerThread(server, echo), \
            RequestClient(ctx, ep, "api", timeout=limit(2.0)) as client:
        assert client.request("service.list", {}) == {"echo": {}}


def test_bind_refuses_endpoint_of_live_process(ctx, rundir):
    ep = endpoint(rundir, runtime.WRITER)
    with RouterServer(ctx, ep):
        with pytest.raises(TransportError, match="in use"):
            RouterServer(ctx, ep)


def test_bind_refuses_non_socket_file(ctx, rundir):
    (rundir / "health.sock").write_text("not a socket")
    with pytest.raises(TransportError, match="not a socket"):
        Puller(ctx, endpoint(rundir, runtime.HEALTH))
