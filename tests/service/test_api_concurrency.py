"""The API as a real process (``python -m gorb.services.api``: gevent WSGIServer, monkey-patched) on a
loopback port, with a real WriterLoop in a thread of this process, hammered by 32 concurrent HTTP
clients (threads, one keep-alive connection each): every answer must be the right one for its
request, also while the writer is stopped and started again on the same endpoint."""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

import gevent
import pytest
import zmq
import zmq.green

from gorb.common import runtime
from gorb.common.transport import RouterServer
from gorb.services.api.writer_client import WriterClient
from tests.pace import limit, wait_until
from tests.service.test_api_support import (
    ROOT,
    ApiProcess,
    WriterThread,
    free_port,
    request,
    short_rundir,
)

pytestmark = pytest.mark.timeout(120)

CLIENTS = 32
PER_CLIENT = 8


@pytest.fixture
def system(tmp_path):
    with short_rundir() as rundir:
        writer = WriterThread(rundir, tmp_path / "state.json")
        api = ApiProcess(rundir, tmp_path, writer_timeout=limit(1.0))  # a limit: 32 clients
        try:
            yield writer, api
        finally:
            code = api.stop()
            writer.stop()
            assert code == 0, f"the API exited with {code} on SIGTERM:\n{api.output()}"


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("GORB_")}


def backend_body(i: int, j: int) -> dict:
    # a distinct endpoint per (client, backend): a crossed reply shows in host or port
    return {"host": f"10.2.{i}.{j + 1}", "port": 1000 + i * PER_CLIENT + j, "weight": 1}


class Client(threading.Thread):
    """One HTTP client; records every wrong answer instead of raising in its thread."""

    def __init__(self, i: int, port: int, until: threading.Event | None = None):
        super().__init__(name=f"client-{i}", daemon=True)
        self.i, self.port, self.until = i, port, until
        self.wrong: list[str] = []
        self.statuses: list[int] = []
        self.ok_after_restart = 0
        self.restarted = False
        self.conn = None

    def call(self, method, path, body=None):
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=limit(20))
            try:
                status, headers, data = request(method, self.port, path, body, conn=self.conn)
                self.statuses.append(status)
                return status, data
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                self.conn.close()
                self.conn = None
                if attempt:
                    self.wrong.append(f"{method} {path}: connection failed: {exc!r}")
                    return None, b""
        return None, b""

    def expect(self, what: str, cond: bool) -> None:
        if not cond:
            self.wrong.append(what)

    def check_get(self, j: int, possible: set[int]) -> None:
        status, data = self.call("GET", f"/service/web/c{self.i}-{j}")
        if status == 503:
            return
        self.expect(f"GET c{self.i}-{j}: {status} {data[:200]!r}", status == 200)
        if status != 200:
            return
        info = json.loads(data)
        want = backend_body(self.i, j)
        self.expect(f"GET c{self.i}-{j} answered for {info['options']['host']}:"
                    f"{info['options']['port']}",
                    (info["options"]["host"], info["options"]["port"]) ==
                    (want["host"], want["port"]))
        self.expect(f"GET c{self.i}-{j}: weight {info['options']['weight']} not in {possible}",
                    info["options"]["weight"] in possible)
        if self.restarted:
            self.ok_after_restart += 1

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # a bug in the test itself must fail it too
            self.wrong.append(f"client crashed: {exc!r}")
        finally:
            if self.conn is not None:
                self.conn.close()

    def _run(self) -> None:
        possible = {j: {1} for j in range(PER_CLIENT)}
        created = set()
        rounds = 0
        while True:
            for j in range(PER_CLIENT):
                path = f"/service/web/c{self.i}-{j}"
                if j not in created:
                    status, data = self.call("PUT", path, backend_body(self.i, j))
                    # 409 only after a 503 whose request the writer did apply
                    if status == 200 or (status == 409 and 503 in self.statuses[:-1]):
                        created.add(j)
                    else:
                        self.expect(f"PUT {path}: {status} {data[:200]!r}", status == 503)
                        continue
                weight = 1 + self.i * 1000 + rounds * PER_CLIENT + j
                status, data = self.call("PATCH", path, {"weight": weight})
                if status == 200:
                    self.expect(f"PATCH {path}: body {data!r}", data == b"")
                    possible[j] = {weight}
                else:
                    self.expect(f"PATCH {path}: {status} {data[:200]!r}", status == 503)
                    possible[j].add(weight)  # may or may not have been applied
                self.check_get(j, possible[j])
            rounds += 1
            if self.until is None or (self.until.is_set() and self.ok_after_restart >= 2):
                return


def run_clients(port: int, until: threading.Event | None = None) -> list[Client]:
    clients = [Client(i, port, until) for i in range(CLIENTS)]
    for c in clients:
        c.start()
    return clients


def join(clients: list[Client], seconds: float = 90) -> None:
    wait_until(lambda: not any(c.is_alive() for c in clients), seconds, "the clients to finish",
               every=0.1)
    wrong = [w for c in clients for w in c.wrong]
    assert wrong == [], f"{len(wrong)} wrong answers, e.g. {wrong[:5]}"


def test_32_concurrent_clients_each_get_their_own_answers(system):
    writer, api = system
    assert request("PUT", api.port, "/service/web", {"host": "10.0.0.1", "port": 80})[0] == 200
    clients = run_clients(api.port)
    join(clients)
    assert all(set(c.statuses) == {200} for c in clients)
    status, _, data = request("GET", api.port, "/service/web")
    assert status == 200
    assert len(json.loads(data)["backends"]) == CLIENTS * PER_CLIENT
    dests = writer.kernel.snapshot()[(2, 6, "10.0.0.1", 80, 0)].dests
    assert len(dests) == CLIENTS * PER_CLIENT
    # the last acknowledged weight of every backend is in the kernel
    weights = {(d.addr, d.port): d.weight for d in dests.values()}
    for c in clients:
        for j in range(PER_CLIENT):
            b = backend_body(c.i, j)
            assert weights[(b["host"], b["port"])] == 1 + c.i * 1000 + j


def test_a_writer_restart_midway_gives_503s_but_never_a_wrong_answer(system):
    writer, api = system
    assert request("PUT", api.port, "/service/web", {"host": "10.0.0.1", "port": 80})[0] == 200
    restarted = threading.Event()
    clients = run_clients(api.port, until=restarted)
    time.sleep(limit(0.5))  # everyone is busy
    writer.stop()
    time.sleep(limit(1.5))  # past the API's writer_timeout (a limit of 1 s): requests get 503s
    for c in clients:
        c.restarted = True
    writer.start()  # same endpoint, state from the state file, same kernel
    restarted.set()
    join(clients)
    statuses = [s for c in clients for s in c.statuses]
    assert statuses.count(503) > 0, "the writer's absence went unnoticed"
    assert set(statuses) <= {200, 409, 503}
    assert all(c.ok_after_restart >= 2 for c in clients), "the API did not recover"
    assert request("GET", api.port, "/health")[0] == 200


def test_the_live_server_reads_chunked_bodies_and_limits_every_body(system):
    """gevent undoes chunked encoding itself; a body over 1 MiB is a 413, chunked or not, and
    the connection stays usable."""
    _, api = system

    def chunks(data: bytes, size: int):
        for i in range(0, len(data), size):
            yield data[i:i + size]

    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=limit(10))
    try:
        body = json.dumps({"host": "10.0.0.1", "port": 80}).encode()
        conn.request("PUT", "/service/web", body=chunks(body, 5), encode_chunked=True)
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"")
        big = b'{"port": 81, "pad": "' + b"x" * (1 << 20) + b'"}'
        for kwargs in ({"body": chunks(big, 65536), "encode_chunked": True}, {"body": big}):
            conn.request("PUT", "/service/big", **kwargs)
            resp = conn.getresponse()
            assert resp.status == 413
            assert json.loads(resp.read())["error"].startswith("request body over")
        conn.request("GET", "/service")
        resp = conn.getresponse()
        assert (resp.status, json.loads(resp.read())) == (200, ["web"])
    finally:
        conn.close()


def test_replies_out_of_order_reach_their_own_greenlets():
    """The writer answers in arrival order; a fake writer that shuffles its replies shows that the
    client matches replies to waiters by id, not by order."""
    n = 64
    with short_rundir() as rundir:
        endpoint = runtime.endpoint(rundir, runtime.WRITER)
        ctx = zmq.Context()
        router = RouterServer(ctx, endpoint)

        def shuffler() -> None:
            got = []

            def arrived() -> bool:
                msg = router.recv(timeout=0.1)
                if msg is not None:
                    got.append(msg)
                return len(got) >= n
            try:
                wait_until(arrived, 10, f"{n} requests at the fake writer", every=0)
            finally:  # what did arrive is answered: the test then says which did not
                random.Random(1).shuffle(got)
                for identity, env in got:
                    router.reply(identity, env, {"ok": True, "errno": "ok", "reason": "",
                                                 "data": env.body}, "fake-writer")

        thread = threading.Thread(target=shuffler, daemon=True)
        thread.start()
        gctx = zmq.green.Context()
        client = WriterClient(gctx, endpoint, timeout=limit(10))
        try:
            jobs = [gevent.spawn(client.request, "service.get", {"service": f"s{i}"})
                    for i in range(n)]
            gevent.joinall(jobs, timeout=limit(15))
            assert [job.value["data"]["service"] if job.successful() else job.exception
                    for job in jobs] == [f"s{i}" for i in range(n)]
        finally:
            client.close()
            gctx.destroy(linger=0)
            thread.join(limit(5))
            router.close()
            ctx.destroy(linger=0)


def test_sigterm_stops_the_api_cleanly(tmp_path):
    with short_rundir() as rundir:
        api = ApiProcess(rundir, tmp_path)  # no writer at all: the API still starts
        status, _, data = request("GET", api.port, "/health")
        assert (status, json.loads(data)["writer"]) == (503, "unavailable")
        assert api.stop() == 0, api.output()


def test_a_dead_reply_reader_exits_70_for_supervisord(tmp_path):
    """If the greenlet reading the writer's replies dies of a bug, every request would time out:
    the process exits 70 instead, for supervisord to restart it."""
    with short_rundir() as rundir:
        code = ("from gevent import monkey; monkey.patch_all(); import sys; "
                "from gorb.services.api import writer_client; "
                "writer_client.WriterClient._read = lambda self: 1 / 0; "
                "from gorb.services.api.main import main; sys.exit(main(sys.argv[1:]))")
        proc = subprocess.run([sys.executable, "-c", code, "--runtime-dir", rundir,
                               "-l", f"127.0.0.1:{free_port()}", "--config", os.devnull],
                              cwd=ROOT, capture_output=True, timeout=limit(30), env=clean_env())
    assert proc.returncode == 70, proc.stderr
    assert b"ZeroDivisionError" in proc.stderr


@pytest.mark.parametrize("config", [
    '[api]\nlisten = "nonsense"\n',
    '[api]\nbogus = 1\n',
    '[api]\nwriter_timeout = 0\n',
    '[gorb]\nruntime_dir = "/tmp/' + "x" * 120 + '"\n',
])
def test_a_bad_configuration_exits_2(tmp_path, config):
    path = tmp_path / "gorb.toml"
    path.write_text(config)
    proc = subprocess.run([sys.executable, "-m", "gorb.services.api", "--config", str(path)],
                          cwd=ROOT, capture_output=True, timeout=limit(30), env=clean_env())
    assert proc.returncode == 2, proc.stderr
    assert b"gorb-api:" in proc.stderr


def test_a_port_in_use_exits_2(tmp_path):
    empty = tmp_path / "gorb.toml"
    empty.write_text("")
    with socket.socket() as s, short_rundir() as rundir:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "gorb.services.api", "--runtime-dir", rundir,
                               "-l", f"127.0.0.1:{port}", "--config", str(empty)], cwd=ROOT,
                              capture_output=True, timeout=limit(30), env=clean_env())
    assert proc.returncode == 2, proc.stderr
    assert b"cannot listen" in proc.stderr
