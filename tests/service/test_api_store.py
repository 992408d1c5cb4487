"""The API's /store routes (qk4l's ``GET /store/sync`` and ``GET /store/sync/status``) in-process
(WebTest), two ways:

- against a fake discovery: a ROUTER at ``ipc://<rundir>/discovery.sock`` in a thread that records
  each request and answers what the test set (every errno, a slow answer, no answer at all), for
  the mapping of replies to statuses, ``force`` and the two timeouts;
- against the real thing: a ``WriterLoop`` on a fake kernel, ``python -m gorb.services.discovery``
  with the Consul double and a KV prefix (``tests/service/test_discovery_consul.py``'s ``Host``),
  where the API's writes reach KV, an emptied prefix is refused and then forced, and Consul down
  is a 503 while the rest of the API keeps answering.

And ``python -m gorb.services.api`` itself: with a store in ``[discovery]`` it asks discovery, without
one it answers 404 without a socket to discovery.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema_rs
import pytest
import webtest
import zmq
import zmq.green

from gorb.common import runtime, store_messages
from gorb.common.errors import MSG_NOT_FOUND
from gorb.common.transport import RouterServer
from gorb.services.api import openapi
from gorb.services.api.app import build
from gorb.services.api.discovery_client import SYNC_TIMEOUT, DiscoveryClient
from gorb.services.api.writer_client import WriterClient
from gorb.services.discovery.syncer import Syncer
from tests.consul_double import ConsulDouble
from tests.pace import limit, wait_until
from tests.service.test_api_support import (
    WriterThread,
    free_port,
    request,
    short_rundir,
    wait_up,
)
from tests.service.test_discovery_consul import Host, kv_delete, kv_put

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
SYNC_OK = {"status": "ok", "applied": [{"op": "service.create", "service": "web",
                                        "backend": None}], "errors": [], "refused": None}
STATUS = {"status": "need sync", "store": "http://127.0.0.1:8500/v1/kv/gorb/",
          "services": {"create": ["web"], "update": [], "delete": []},
          "backends": {"create": [], "update": [], "delete": []},
          "writes": {"put": [], "delete": []}, "refused": None, "errors": []}


def ok(data) -> dict:
    return {"ok": True, "errno": "ok", "reason": "", "data": data}


def fail(errno: str, reason: str, data=None) -> dict:
    return {"ok": False, "errno": errno, "reason": reason, "data": data}


class FakeDiscovery:
    """discovery's control socket, answering ``replies[type]`` after ``delay`` seconds."""

    def __init__(self, rundir: str):
        runtime.ensure_runtime_dir(os.path.join(rundir, runtime.DISCOVERY_DIR))
        self.endpoint = store_messages.endpoint(rundir)
        self.replies = {"store.sync": ok(SYNC_OK), "store.status": ok(STATUS)}
        self.delay = 0.0
        self.requests: list[tuple[str, dict]] = []
        self.running = True
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fake-discovery", daemon=True)
        self.thread.start()
        assert self._ready.wait(limit(5))

    def _run(self) -> None:
        ctx = zmq.Context()
        router = RouterServer(ctx, self.endpoint)
        self._ready.set()
        try:
            while self.running:
                got = router.recv(timeout=0.05)
                if got is None:
                    continue
                identity, env = got
                self.requests.append((env.type, env.body))
                time.sleep(self.delay)
                router.reply(identity, env, self.replies[env.type], "discovery")
        finally:
            router.close()
            ctx.destroy(linger=0)

    def stop(self) -> None:
        self.running = False
        self.thread.join(limit(5))


class Api:
    """The app on a real writer loop (fake kernel), its /store routes on ``discovery``."""

    def __init__(self, rundir: str, writer_endpoint: str | None = None, store: bool = True,
                 **client_kw):
        self.ctx = zmq.green.Context()
        self.writer = None
        if writer_endpoint is None:
            self.writer = WriterThread(rundir)
            writer_endpoint = self.writer.endpoint
        self.client = WriterClient(self.ctx, writer_endpoint, timeout=limit(5.0))
        self.discovery = DiscoveryClient(self.ctx, store_messages.endpoint(rundir),
                                         **client_kw) if store else None
        _, wsgi = build(self.client, discovery=self.discovery)
        self.app = webtest.TestApp(wsgi)

    def get(self, path: str) -> tuple[int, object]:
        resp = self.app.get(path, expect_errors=True)
        assert resp.content_type == "application/json", resp
        return resp.status_int, json.loads(resp.body)

    def call(self, method: str, path: str, body=None) -> int:
        kw = {"expect_errors": True}
        if body is not None:
            kw["params"] = json.dumps(body).encode()
        return getattr(self.app, method.lower())(path, **kw).status_int

    def close(self) -> None:
        self.client.close()
        if self.discovery is not None:
            self.discovery.close()
        self.ctx.destroy(linger=0)
        if self.writer is not None:
            self.writer.stop()


@pytest.fixture
def rundir():
    with short_rundir() as d:
        yield d


@pytest.fixture
def fake(rundir):
    f = FakeDiscovery(rundir)
    yield f
    f.stop()


@pytest.fixture
def api(rundir):
    made: list[Api] = []

    def make(**kw) -> Api:
        a = Api(rundir, **kw)
        made.append(a)
        return a

    yield make
    for a in made:
        a.close()


# --- against a fake discovery ---------------------------------------------------------------------

@pytest.mark.parametrize("query, force", [
    ("", False), ("?force=true", True), ("?force=True", True), ("?force=1", True),
    ("?force=yes", True), ("?force=false", False), ("?force=0", False), ("?force=", False),
    ("?other=1", False),
])
def test_sync_passes_force_and_answers_what_was_applied(fake, api, query, force):
    status, body = api().get(f"/store/sync{query}")
    assert (status, body) == (200, SYNC_OK)
    assert fake.requests == [("store.sync", {"force": force})]


def test_status_is_the_dry_run(fake, api):
    assert api().get("/store/sync/status") == (200, STATUS)
    assert fake.requests == [("store.status", {})]


def test_a_bad_force_is_a_400_and_nothing_is_asked(fake, api):
    status, body = api().get("/store/sync?force=maybe")
    assert (status, body) == (400, {"error": "force must be true or false, not 'maybe'"})
    assert fake.requests == []


@pytest.mark.parametrize("path", ["/store/sync", "/store/sync/status"])
@pytest.mark.parametrize("reply, status, text", [
    (fail("invalid", "sync refused: the store is empty and would delete 3 services",
          {"status": "refused", "applied": [], "errors": [], "refused": "the store is empty"}),
     400, "sync refused: the store is empty and would delete 3 services"),
    (fail("not_found", MSG_NOT_FOUND), 404, MSG_NOT_FOUND),
    (fail("unavailable", "ipvs-writer: no reply"), 503, "ipvs-writer: no reply"),
    (fail("unavailable", "the store sync is busy"), 503, "the store sync is busy"),
    (fail("kernel", "error while calling into IPVS: boom"), 500,
     "error while calling into IPVS: boom"),
    (fail("bogus", "what"), 500, "what"),  # an errno outside the table: a 500, not a crash
])
def test_discovery_refusals_map_to_gorbs_statuses(fake, api, path, reply, status, text):
    fake.replies = {"store.sync": reply, "store.status": reply}
    assert api().get(path) == (status, {"error": text})


def test_without_a_store_both_routes_are_404_without_asking(fake, api):
    a = api(store=False)
    for path in ("/store/sync", "/store/sync?force=true", "/store/sync/status"):
        assert a.get(path) == (404, {"error": MSG_NOT_FOUND})
    assert fake.requests == []


def test_discovery_not_running_is_a_quick_503(api):
    a = api(connect_timeout=0.3)
    for path in ("/store/sync", "/store/sync/status"):
        t0 = time.monotonic()
        status, body = a.get(path)
        assert status == 503 and body["error"].startswith("discovery is not running"), body
        assert time.monotonic() - t0 < limit(1.7, fixed=0.3)  # the connect_timeout + a limit
    assert a.get("/service") == (200, [])  # the writer's routes are not affected


def test_a_slow_discovery_is_a_503_and_its_late_reply_is_dropped(fake, api):
    a = api(timeout=0.4)
    fake.delay = 1.0
    status, body = a.get("/store/sync")
    assert (status, body) == (503, {"error": "discovery did not answer within 0.4s"})
    fake.delay = 0.0
    time.sleep(1.0)  # the late reply arrives and must not answer the next request
    assert a.get("/store/sync/status") == (200, STATUS)
    assert a.discovery.stale_replies == 1


def test_the_sync_timeout_outlasts_discoverys_own_busy_answer():
    busy = inspect.signature(Syncer.request).parameters["timeout"].default  # 30 s
    assert SYNC_TIMEOUT >= 30.0 and SYNC_TIMEOUT > busy


def test_replies_match_the_documented_schemas(fake, api):
    doc = openapi.document()

    def valid(name, value) -> list[str]:
        v = jsonschema_rs.Draft202012Validator({"$ref": f"#/components/schemas/{name}",
                                                "components": doc["components"]})
        return [e.message for e in v.iter_errors(value)]

    a = api()
    assert valid("SyncResult", a.get("/store/sync")[1]) == []
    assert valid("StoreStatus", a.get("/store/sync/status")[1]) == []
    assert valid("SyncResult", {**SYNC_OK, "status": "refused"}) != []  # refused is a 400
    ops = doc["paths"]["/store/sync"]["get"]
    assert [p["name"] for p in ops["parameters"]] == ["force"]
    assert set(ops["responses"]) == {"200", "400", "404", "500", "503"}


# --- the API process ------------------------------------------------------------------------------

def _api_process(rundir: str, tmp: Path, discovery: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = tmp / "gorb.toml"
    config.write_text(f'[gorb]\nruntime_dir = "{rundir}"\nlog_level = "warning"\n'
                      f'[api]\nlisten = "127.0.0.1:{port}"\n[discovery]\n{discovery}')
    env = {k: v for k, v in os.environ.items() if not k.startswith("GORB_")}
    proc = subprocess.Popen([sys.executable, "-m", "gorb.services.api", "--config", str(config)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=(tmp / "api.log").open("wb"))
    try:
        wait_up(proc, port, (tmp / "api.log").read_text)
    except AssertionError:
        proc.kill()
        raise
    return proc, port


@pytest.mark.parametrize("discovery, asked", [
    ('consul = "http://127.0.0.1:1"\nkv_prefix = "gorb"\n', True),
    ('store_dir = "/nonexistent"\n', True),
    ('consul = "http://127.0.0.1:1"\n', False),  # registration only: no store
    ("", False),
])
def test_the_api_process_asks_discovery_only_with_a_store(fake, rundir, tmp_path, discovery,
                                                          asked):
    proc, port = _api_process(rundir, tmp_path, discovery)
    try:
        status, _, body = request("GET", port, "/store/sync?force=true")
        if asked:
            assert (status, json.loads(body)) == (200, SYNC_OK)
            assert fake.requests == [("store.sync", {"force": True})]
        else:
            assert (status, json.loads(body)) == (404, {"error": MSG_NOT_FOUND})
            assert fake.requests == []
    finally:
        proc.terminate()
        assert proc.wait(limit(10)) == 0


# --- against the real discovery, writer and Consul double ---------------------------------------

@pytest.fixture
def host(base, consul):
    h = Host(base, "lb1", {"consul": consul.url, "kv_prefix": "gorb"})
    yield h
    try:
        h.close()
    finally:
        sys.stderr.write(f"--- discovery log ---\n{h.log.read_text()}")


def test_end_to_end_with_discovery_and_the_consul_double(host, consul):
    a = Api(host.rundir, writer_endpoint=host.writer.endpoint)
    try:
        _end_to_end(a, host, consul)
    finally:
        a.close()


def _end_to_end(a: Api, host: Host, consul: ConsulDouble) -> None:
    # the API's writes reach KV through discovery; the store is then in sync
    assert a.call("PUT", "/service/s1", {"host": "10.0.0.1", "port": 80}) == 200
    assert a.call("PUT", "/service/s1/a", {"host": "10.1.0.1", "port": 8080,
                                           "pulse": {"type": "none"}}) == 200
    for i in (2, 3):
        assert a.call("PUT", f"/service/s{i}", {"host": f"10.0.0.{i}", "port": 80}) == 200
    wait_until(lambda: {"gorb/services/s1", "gorb/services/s2", "gorb/services/s3",
                        "gorb/backends/s1/a"} <= set(consul.kv),
               8, "KV written back")
    wait_until(lambda: a.get("/store/sync/status")[1]["status"] == "ok", 8, "in sync")
    status, body = a.get("/store/sync")
    assert (status, body) == (200, {"status": "ok", "applied": [], "errors": [],
                                    "refused": None})
    # a KV change, applied by a sync on demand
    kv_put(consul, "gorb/services/s2", {"host": "10.0.0.2", "port": 80, "method": "rr"})
    status, body = a.get("/store/sync")
    assert status == 200 and body["status"] == "ok"
    wait_until(lambda: host.views()["s2"]["options"]["method"] == "rr", 8, "KV change applied")

    # an emptied prefix: the dry run shows it refused, the sync is a 400, the kernel keeps all
    kv_delete(consul, "gorb/", recurse=True)
    wait_until(lambda: a.get("/store/sync/status")[1]["status"] == "refused", 8, "refused")
    status, body = a.get("/store/sync/status")
    assert sorted(body["services"]["delete"]) == ["s1", "s2", "s3"]
    assert "the store is empty" in body["refused"]
    status, body = a.get("/store/sync")
    assert status == 400 and body["error"].startswith("sync refused: the store is empty"), body
    assert a.get("/service") == (200, ["s1", "s2", "s3"])
    assert len(host.writer_objs.kernel.table) == 3
    # forced, it empties the writer and the kernel
    status, body = a.get("/store/sync?force=true")
    assert status == 200 and body["status"] == "ok", body
    assert sorted(c["service"] for c in body["applied"]) == ["s1", "s2", "s3"]
    assert a.get("/service") == (200, [])
    assert host.writer_objs.kernel.table == {}

    # Consul down: the store routes are 503 (discovery cannot read the store); the rest answers
    consul.stop()
    try:
        assert a.call("PUT", "/service/s4", {"host": "10.0.0.4", "port": 80}) == 200
        status, body = a.get("/store/sync/status")
        assert status == 503 and "Consul" in body["error"], body
        assert a.get("/store/sync")[0] == 503
        assert a.get("/service") == (200, ["s4"])
    finally:
        consul.start()
    wait_until(lambda: "gorb/services/s4" in consul.kv, 8, "caught up after the outage")
    wait_until(lambda: a.get("/store/sync/status") == (200, {
        "status": "ok", "store": f"{consul.url}/v1/kv/gorb/",
        "services": {"create": [], "update": [], "delete": []},
        "backends": {"create": [], "update": [], "delete": []},
        "writes": {"put": [], "delete": []}, "refused": None, "errors": []}),
               8, "in sync")
