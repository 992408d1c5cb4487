"""The discovery process (``python -m gorb.services.discovery``) against a real writer loop on a fake
kernel and the Consul double: registrations and checks, the agent losing them, Consul going away
and coming back, and the Consul KV configuration store in both directions.

Harness: ``WriterLoop`` in a thread over ipc:// sockets in a short /tmp runtime dir (as
test_writer_bus.py), ``ConsulDouble`` on a free port, discovery as a child process with a TOML
config (check_interval 0.5 s, retry_max 1 s). ``Host.writer`` sends what the API would send.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from gorb.common import runtime, store_messages
from gorb.common.transport import Pusher, RequestClient
from tests.consul_double import ConsulDouble
from tests.pace import limit, wait_until
from tests.service.writer_thread import WriterThread

pytestmark = pytest.mark.timeout(40)

ROOT = Path(__file__).resolve().parents[2]
from tests.unit.test_engine import OK  # noqa: E402  (a mutation's data is its change)


Writer = WriterThread  # one writer process's objects, its loop in a thread


class Host:
    """One gorb host: a writer, a discovery process, and clients for both."""

    def __init__(self, base: Path, name: str, discovery: dict, start: bool = True):
        self.dir = base / name
        self.dir.mkdir()
        self.rundir = str(runtime.ensure_runtime_dir(self.dir / "run", 0o700))
        self.writer_objs = Writer(self.rundir, self.dir / "state.json")
        self.ctx = zmq.Context()
        self.writer = RequestClient(self.ctx, runtime.endpoint(self.rundir, runtime.WRITER),
                                    "test", timeout=limit(5.0))
        self.control = RequestClient(self.ctx, store_messages.endpoint(self.rundir), "test-api",
                                     timeout=limit(10.0))
        self.config = self.dir / "gorb.toml"
        lines = ["[gorb]", 'log_level = "debug"', "[discovery]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in {"hostname": name, "check_interval": 0.5,
                                                       "retry_max": 1.0, **discovery}.items()]
        self.config.write_text("\n".join(lines) + "\n")
        self.log = self.dir / "discovery.log"
        self.proc: subprocess.Popen | None = None
        if start:
            self.start()

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GORB_", "CONSUL_"))}
        env["PYTHONPATH"] = str(ROOT)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gorb.services.discovery", "--config", str(self.config),
             "--runtime-dir", self.rundir], cwd=ROOT, env=env,
            stdout=subprocess.DEVNULL, stderr=self.log.open("ab"))

    def views(self) -> dict:
        reply = self.writer.request("state.dump", {})
        assert reply["ok"], reply
        return reply["data"]["services"]

    def ask(self, type_: str, body: dict) -> dict:
        return self.control.request(type_, body)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                assert self.proc.wait(limit(5)) == 0, f"discovery exited {self.proc.returncode}"
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()
        self.writer.close()
        self.control.close()
        self.ctx.destroy(linger=0)
        self.writer_objs.stop()


@pytest.fixture
def hosts(base):
    made: list[Host] = []

    def make(name="lb1", **discovery) -> Host:
        h = Host(base, name, discovery)
        made.append(h)
        return h

    yield make
    failures = []
    for h in made:
        try:
            h.close()
        except Exception as exc:  # close every host before reporting
            failures.append(exc)
        # pytest shows the captured output of failed tests only
        sys.stderr.write(f"--- discovery log of {h.dir.name} ---\n{h.log.read_text()}")
    if failures:
        raise failures[0]


def svc(vs, host, port=80, **opts):
    return {"service": vs, "options": {"host": host, "port": port, **opts}}


def be(vs, rs, host, port=8080, **opts):
    return {"service": vs, "backend": rs, "options": {"host": host, "port": port, **opts}}


def mark_health(h: Host, vs: str, rs_status: dict[str, str]) -> None:
    """Push pulse results for backends of ``vs`` through the writer's PUSH socket."""
    targets = h.writer.request("pulse.targets", {"worker": 0, "workers": 1})["data"]["targets"]
    view = h.views()[vs]
    results = []
    for rs, status in rs_status.items():
        b = view["backends"][rs]
        key = next(t["key"] for t in targets
                   if t["address"] == b["address"] and t["port"] == b["options"]["port"])
        results.append({"key": key, "ok": status == "up", "status": status, "at": time.time()})
    with Pusher(h.ctx, runtime.endpoint(h.rundir, runtime.HEALTH), "test-pulse") as p:
        p.send("health.results", {"worker": 0, "full": False, "results": results})


# --- registration ---------------------------------------------------------------------------------

def test_registration_follows_services_and_health(consul, hosts):
    h = hosts(consul=consul.url)
    assert h.writer.request("service.create", svc("web", "10.0.0.1", method="rr")) == OK
    for rs, ip in (("a", "10.1.0.1"), ("b", "10.1.0.2")):
        assert h.writer.request("backend.create", be("web", rs, ip)) == OK
    assert h.writer.request("service.create", svc("dns", "10.0.0.2", 53, protocol="udp")) == OK

    def registered():
        s = consul.services
        return "web" in s and "dns" in s and s
    s = wait_until(registered, 8, "registrations")
    web = s["web"]
    assert (web["ID"], web["Service"], web["Address"], web["Port"]) == ("web", "web",
                                                                        "10.0.0.1", 80)
    assert sorted(web["Tags"]) == ["gorb", "rr", "tcp"]
    assert web["Meta"] == {"protocol": "tcp", "scheduler": "rr", "gorb_host": "lb1"}
    assert sorted(s["dns"]["Tags"]) == ["gorb", "udp", "wrr"]
    checks = consul.checks
    assert checks["service:web"]["Status"] == "passing"      # backends not checked yet
    assert checks["service:dns"]["Status"] == "critical"     # no backends at all

    def status(sid="service:web"):
        return consul.checks[sid]["Status"]
    mark_health(h, "web", {"a": "down"})
    wait_until(lambda: status() == "warning", 8, "warning with one backend down")
    assert "down: a" in consul.checks["service:web"]["Output"]
    mark_health(h, "web", {"b": "down"})
    wait_until(lambda: status() == "critical", 8, "critical with every backend down")
    mark_health(h, "web", {"a": "up", "b": "up"})
    wait_until(lambda: status() == "passing", 8, "passing again")

    assert h.writer.request("service.delete", {"service": "dns"}) == OK
    wait_until(lambda: "dns" not in consul.services and "web" in consul.services, 8,
               "deregistration")
    assert "service:dns" not in consul.checks


def test_checks_stay_fresh_and_lost_registrations_come_back(consul, hosts):
    h = hosts(consul=consul.url)
    assert h.writer.request("service.create", svc("web", "10.0.0.1")) == OK
    assert h.writer.request("backend.create", be("web", "a", "10.1.0.1")) == OK
    wait_until(lambda: "web" in consul.services, 8, "the registration")
    time.sleep(2.5)  # more than the 2 s TTL: only refreshes keep it passing
    assert consul.checks["service:web"]["Status"] == "passing"
    consul.forget_agent()
    assert consul.services == {}
    wait_until(lambda: "web" in consul.services and "service:web" in consul.checks, 8,
               "re-registration after the agent forgot")
    assert consul.checks["service:web"]["Status"] == "passing"


def test_consul_outage_blocks_nothing_and_is_caught_up(consul, hosts):
    h = hosts(consul=consul.url, kv_prefix="gorb")
    assert h.writer.request("service.create", svc("web", "10.0.0.1")) == OK
    wait_until(lambda: "web" in consul.services and "gorb/services/web" in consul.kv, 8,
               "the registration and the KV write-back")
    consul.stop()
    t0 = time.monotonic()
    assert h.writer.request("service.create", svc("api", "10.0.0.2", 443)) == OK
    assert h.writer.request("backend.create", be("api", "a", "10.1.0.5")) == OK
    assert h.writer.request("service.delete", {"service": "web"}) == OK
    assert time.monotonic() - t0 < limit(1.0)  # the writer never waits for Consul
    status = h.ask("store.status", {})
    assert status["ok"] is False and status["errno"] == "unavailable"
    time.sleep(2.0)
    assert h.proc.poll() is None  # discovery is still running
    consul.start()
    t1 = time.monotonic()
    wait_until(lambda: set(consul.services) == {"api"}, 8, "registrations caught up")
    wait_until(lambda: set(consul.kv) == {"gorb/format", "gorb/services/api",
                                          "gorb/backends/api/a"},
               8, "KV caught up")
    assert time.monotonic() - t1 < limit(5.0)
    assert h.ask("store.status", {})["data"]["status"] == "ok"


# --- the Consul KV store --------------------------------------------------------------------------

def kv_put(consul: ConsulDouble, key: str, doc) -> None:
    import consul as client
    c = client.Consul(host=consul.host, port=consul.port)
    assert c.kv.put(key, json.dumps(doc) if not isinstance(doc, bytes) else doc)


def kv_delete(consul: ConsulDouble, key: str, recurse: bool = False) -> None:
    import consul as client
    client.Consul(host=consul.host, port=consul.port).kv.delete(key, recurse=recurse)


def test_kv_documents_become_writer_commands(consul, hosts):
    h = hosts(consul=consul.url, kv_prefix="gorb")
    kv_put(consul, "gorb/services/web", {"host": "10.0.0.1", "port": 80, "protocol": "TCP"})
    kv_put(consul, "gorb/backends/web/a", {"host": "10.1.0.1", "port": 8080, "weight": 7})
    kv_put(consul, "gorb/services/bad", {"port": 80, "protocol": "icmp"})
    views = wait_until(lambda: "web" in h.views() and h.views()["web"]["backends"] and h.views(),
                       8, "the writer has the KV service")
    assert views["web"]["options"]["protocol"] == "tcp"
    assert views["web"]["backends"]["a"]["options"]["weight"] == 7
    assert "bad" not in views
    key = (2, 6, "10.0.0.1", 80, 0)
    assert key in h.writer_objs.kernel.table
    assert h.writer_objs.kernel.table[key].dests[("10.1.0.1", 8080)].weight == 7
    # a weight change in KV is a backend.update; a scheduler change a service.update
    kv_put(consul, "gorb/backends/web/a", {"host": "10.1.0.1", "port": 8080, "weight": 3})
    kv_put(consul, "gorb/services/web", {"host": "10.0.0.1", "port": 80, "method": "rr"})
    wait_until(lambda: h.writer_objs.kernel.table[key].dests[("10.1.0.1", 8080)].weight == 3
               and h.writer_objs.kernel.table[key].sched == "rr",
               8, "KV updates applied")
    status = h.ask("store.status", {})["data"]
    assert status["status"] == "ok"
    assert [e["object"] for e in status["errors"]] == ["gorb/services/bad"]
    # the round trip is stable: nothing written back to KV, nothing re-applied to the kernel
    time.sleep(0.5)
    kv_writes = [r for r in consul.requests if r.method != "GET" and "/kv/" in r.path]
    applied = len(h.writer_objs.kernel.applied)
    time.sleep(1.5)
    assert [r for r in consul.requests if r.method != "GET" and "/kv/" in r.path] == kv_writes
    assert len(kv_writes) == 5  # the test's own puts
    assert len(h.writer_objs.kernel.applied) == applied
    kv_delete(consul, "gorb/backends/web/a")
    wait_until(lambda: not h.views()["web"]["backends"], 8, "KV backend delete applied")


def test_rest_changes_are_written_back_with_cas(consul, hosts):
    h = hosts(consul=consul.url, kv_prefix="gorb")
    assert h.writer.request("service.create", svc("web", "10.0.0.1")) == OK
    assert h.writer.request("backend.create", be("web", "a", "10.1.0.1")) == OK
    wait_until(lambda: "gorb/backends/web/a" in consul.kv, 8, "write-back")
    doc = json.loads(consul.kv["gorb/services/web"])
    assert (doc["host"], doc["port"], doc["protocol"], doc["method"]) == ("10.0.0.1", 80,
                                                                          "tcp", "wrr")
    assert json.loads(consul.kv["gorb/backends/web/a"])["weight"] == 100
    puts = [r for r in consul.requests if r.method == "PUT" and r.path.startswith("/v1/kv/gorb/")]
    assert puts and all("cas" in r.query for r in puts)
    assert h.writer.request("backend.update", {"service": "web", "backend": "a",
                                               "weight": 0}) == OK
    wait_until(lambda: json.loads(consul.kv["gorb/backends/web/a"])["weight"] == 0, 8,
               "PATCH weight written back")
    assert h.writer.request("service.delete", {"service": "web"}) == OK
    wait_until(lambda: set(consul.kv) == {"gorb/format"}, 8, "delete written back")
    # the writer keeps nothing extra and the store is quiet
    assert h.ask("store.status", {})["data"]["status"] == "ok"


def test_two_hosts_share_the_configuration(consul, hosts):
    # one agent for both hosts (a test bed): one registration per host, none fought over
    a = hosts("lb1", consul=consul.url, kv_prefix="gorb", id_format="{service}@{host}")
    b = hosts("lb2", consul=consul.url, kv_prefix="gorb", id_format="{service}@{host}")
    assert a.writer.request("service.create", svc("web", "10.0.0.1")) == OK
    assert a.writer.request("backend.create", be("web", "x", "10.1.0.1")) == OK
    assert a.writer.request("service.create", svc("api", "10.0.0.2")) == OK
    wait_until(lambda: set(b.views()) == {"web", "api"} and b.views()["web"]["backends"], 8,
               "lb2 has lb1's services")
    assert b.writer.request("backend.create", be("web", "y", "10.1.0.2")) == OK
    wait_until(lambda: set(a.views()["web"]["backends"]) == {"x", "y"}, 8, "lb1 has lb2's")
    assert a.writer.request("service.delete", {"service": "web"}) == OK
    wait_until(lambda: set(b.views()) == {"api"}, 8, "the delete reached lb2")
    time.sleep(0.5)
    assert set(a.views()) == {"api"} and "gorb/services/web" not in consul.kv
    wait_until(lambda: set(consul.services) == {"api@lb1", "api@lb2"}, 8, "one api per host")
    registers = [r for r in consul.requests if r.path == "/v1/agent/service/register"]
    time.sleep(1.2)  # two full cycles each: nothing re-registered
    assert [r for r in consul.requests if r.path == "/v1/agent/service/register"] == registers


def test_an_emptied_prefix_does_not_empty_the_writer_unless_forced(consul, hosts):
    h = hosts(consul=consul.url, kv_prefix="gorb")
    for i in (1, 2, 3):
        kv_put(consul, f"gorb/services/s{i}", {"host": f"10.0.0.{i}", "port": 80})
    wait_until(lambda: set(h.views()) == {"s1", "s2", "s3"}, 8, "the KV services applied")
    kv_delete(consul, "gorb/", recurse=True)

    def refused():
        data = h.ask("store.status", {})["data"]
        return data["status"] == "refused" and data
    data = wait_until(refused, 8, "refused status")
    assert "the store is empty" in data["refused"]
    assert sorted(data["services"]["delete"]) == ["s1", "s2", "s3"]
    time.sleep(1.0)
    assert set(h.views()) == {"s1", "s2", "s3"}  # the kernel keeps its services
    reply = h.ask("store.sync", {"force": False})
    assert reply["ok"] is False and reply["errno"] == "invalid"
    assert reply["reason"].startswith("sync refused: the store is empty")
    assert reply["data"]["status"] == "refused" and reply["data"]["applied"] == []
    reply = h.ask("store.sync", {"force": True})
    assert reply["ok"] is True and reply["data"]["status"] == "ok"
    assert sorted(c["service"] for c in reply["data"]["applied"]) == ["s1", "s2", "s3"]
    assert {c["op"] for c in reply["data"]["applied"]} == {"service.delete"}
    assert h.views() == {}


def test_control_socket(consul, hosts):
    h = hosts(consul=consul.url, kv_prefix="gorb")
    assert h.writer.request("service.create", svc("web", "10.0.0.1")) == OK
    wait_until(lambda: "gorb/services/web" in consul.kv, 8, "the KV write-back")
    kv_put(consul, "gorb/services/web", {"host": "10.0.0.1", "port": 80, "method": "lc"})
    kv_put(consul, "gorb/services/api", {"host": "10.0.0.2", "port": 443})
    reply = h.ask("store.sync", {})
    assert reply["ok"] is True, reply
    assert reply["data"]["status"] in ("ok",)
    wait_until(lambda: h.views()["web"]["options"]["method"] == "lc" and "api" in h.views(), 8,
               "the sync applied")
    status = h.ask("store.status", {})
    assert status["ok"] and status["data"] == {
        "status": "ok", "store": f"{consul.url}/v1/kv/gorb/",
        "services": {"create": [], "update": [], "delete": []},
        "backends": {"create": [], "update": [], "delete": []},
        "writes": {"put": [], "delete": []}, "refused": None, "errors": []}
    bad = h.ask("store.sync", {"force": "yes"})
    assert bad["ok"] is False and bad["errno"] == "invalid"
    assert h.ask("store.nope", {})["errno"] == "invalid"


def test_registration_only_has_no_store(consul, hosts):
    h = hosts(consul=consul.url)
    for type_ in ("store.sync", "store.status"):
        assert h.ask(type_, {}) == {"ok": False, "errno": "not_found",
                                    "reason": "unable to locate specified object", "data": None}


def test_a_url_without_scheme_is_a_config_error(base):
    cfg = base / "gorb.toml"
    cfg.write_text('[discovery]\nconsul = "127.0.0.1:8500"\n')
    out = subprocess.run([sys.executable, "-m", "gorb.services.discovery", "--config", str(cfg),
                          "--runtime-dir", str(base / "run")], cwd=ROOT, capture_output=True,
                         text=True, timeout=limit(20), env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2
    assert "has no scheme: write it as a URL, e.g. http://127.0.0.1:8500" in out.stderr
