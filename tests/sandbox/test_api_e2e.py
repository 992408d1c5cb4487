"""The whole supervised system end to end: ``gorb run`` in the NAT topology's ``lb`` namespace,
driven only over HTTP, checked against the kernel (``ipvsadm -Ln``) and real traffic.

One ``gorb run`` serves the whole module (starting it costs ~10 s in the guest): supervisord with
ipvs-writer, api (GORB's default ``-l :4672``) and two pulse workers, ``writer.device = "cl"`` (the
lb's address toward the client, 10.77.254.1, is the default VIP). Every test uses its own
service ids and VIP ports, so they do not see each other's objects.

The test process reaches the API through sockets created inside ``lb`` (``Gorb.http``: a short
thread enters the namespace to connect), each request on a fresh connection as curl makes them.
Traffic comes from the topology's client namespace through the VIP 10.77.0.100 to the backends'
HTTP servers (``topology.py``).

What is shown:
- every route, and after each mutation the kernel (scheduler, flags, persistence, forwarding,
  weights) and GORB's GET shapes;
- GORB's error catalogue, status and text, table-driven, and that a refused request changes
  nothing; the upstream bugs that are fixed (``"expect": 200`` as a number, PATCH of a service's
  key, PATCH of a backend without ``weight``);
- real traffic: rr over three backends created over HTTP with http checks, a PATCH to weight 0
  drains one, a stopped server is drained by pulse and comes back; /metrics counts the traffic;
- ``gorb ctl restart api`` while clients write: nothing but connection errors during the
  restart, every 200 visible afterwards in GET and in the kernel.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.pace import limit, wait_until
from tests.sandbox import topology
from tests.sandbox.conftest import ipvsadm, sh
from tests.sandbox.test_supervised import PROGRAMS, Gorb, Reply, proc_table
from tests.sandbox.topology import (
    BACKEND_PORT,
    CLIENT_GW,
    PYTHON,
    SERVER,
    VIP,
    VIP_PORT,
    Topology,
    _read_line,
    _stop,
)

DEVICE = "cl"  # the lb's end of the client link: its address is the default VIP
MSG_NOT_FOUND = "unable to locate specified object"
MSG_EXISTS = "specified object already exists"


@dataclass
class System:
    topo: Topology
    gorb: Gorb

    def kernel(self) -> dict[str, dict]:
        return ipvsadm(self.topo.lb)

    def table(self) -> dict[str, dict]:
        """The kernel's dests per service without a fork (see ``proc_table``)."""
        return proc_table(self.gorb.proc.pid)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """The topology (3 backends) and one ``gorb run`` in its lb namespace, for the module."""
    made: list[str] = []

    def netns(prefix: str = "g") -> str:  # conftest's factory is per test; this one per module
        name = f"{prefix}{os.getpid() % 1000}e{len(made) + 1}"
        sh(f"ip netns add {name}")
        sh("ip link set lo up", ns=name)
        made.append(name)
        return name

    topo = gorb = None
    try:
        topo = topology.build(netns, n_backends=3)
        gorb = Gorb(topo.lb, tmp_path_factory.mktemp("gorb"), listen=":4672", device=DEVICE)
        gorb.wait_states({p: "RUNNING" for p in PROGRAMS})
        gorb.wait_api()
        yield System(topo, gorb)
    finally:
        if gorb is not None:
            gorb.close()
        if topo is not None:
            topo.close()
        for name in made:
            sh(f"ip netns pids {name} | xargs -r kill -9", check=False)
            sh(f"ip netns del {name}", check=False)


# --- response checks ------------------------------------------------------------------------------

def ok(reply: Reply) -> None:
    """GORB's success for PUT/PATCH/DELETE: 200, empty body, no Content-Type."""
    assert (reply.status, reply.raw) == (200, b""), reply
    assert "content-type" not in reply.headers, reply.headers


def got(reply: Reply):
    """GORB's success for GET: 200, JSON, tab-indented without a trailing newline."""
    assert reply.status == 200, reply
    assert reply.headers["content-type"].startswith("application/json"), reply.headers
    if reply.raw[:1] in (b"{", b"[") and len(reply.raw) > 2:
        assert reply.raw.startswith((b"{\n\t", b"[\n\t")) and not reply.raw.endswith(b"\n")
    return reply.json()


def check_error(reply: Reply, status: int, text: str) -> None:
    """``{"error": text}`` with ``status``; a ``text`` ending in ``*`` is a prefix."""
    assert reply.status == status, reply
    assert reply.headers["content-type"].startswith("application/json"), reply.headers
    error = reply.json()["error"]
    if text.endswith("*"):
        assert error.startswith(text[:-1]), error
    else:
        assert error == text, error


def get(e2e: System, path: str):
    return got(e2e.gorb.http("GET", path))


NO_PULSE = {"type": "none"}  # backends at addresses that do not exist keep their weights


# --- every route ----------------------------------------------------------------------------------

def test_health_and_openapi(e2e):
    assert get(e2e, "/health") == {"api": "ok", "writer": "ok", "auth": "off"}
    doc = get(e2e, "/openapi.json")
    assert doc["openapi"].startswith("3.1"), doc["openapi"]
    assert {"/service", "/service/{vs}", "/service/{vs}/{rs}", "/health", "/metrics",
            "/openapi.json"} <= set(doc["paths"])
    assert set(doc["paths"]["/service/{vs}"]) >= {"put", "get", "patch", "delete"}
    assert set(doc["paths"]["/service/{vs}/{rs}"]) >= {"put", "get", "patch", "delete"}


def test_every_service_and_backend_route_reaches_the_kernel(e2e):
    http = e2e.gorb.http
    key = f"TCP {VIP}:81"

    # PUT /service: sh with GORB's flags and persistence really applied (a no-op in GORB)
    ok(http("PUT", "/service/svc", {"host": VIP, "port": 81, "protocol": "tcp", "method": "sh",
                                    "flags": "sh-fallback|sh-port", "persistent": True,
                                    "pulse": NO_PULSE}))
    assert e2e.kernel()[key] == {"sched": "sh", "flags": "(sh-fallback,sh-port) persistent 300",
                                 "dests": {}}
    info = get(e2e, "/service/svc")
    assert {k: info["options"][k] for k in ("host", "port", "protocol", "method", "flags",
                                            "persistent")} == {
        "host": VIP, "port": 81, "protocol": "tcp", "method": "sh",
        "flags": "sh-fallback|sh-port", "persistent": True}
    assert (info["health"], info["backends"], info["address"]) == (1, [], VIP)
    assert "svc" in get(e2e, "/service")

    # PATCH /service: scheduler, flags and persistence changed in place (netlink set)
    ok(http("PATCH", "/service/svc", {"method": "rr", "flags": "", "persistent": False}))
    assert e2e.kernel()[key] == {"sched": "rr", "flags": "", "dests": {}}
    ok(http("PATCH", "/service/svc", {"persistent": True, "timeout": 120}))
    assert e2e.kernel()[key]["flags"] == "persistent 120"
    opts = get(e2e, "/service/svc")["options"]
    assert (opts["method"], opts["flags"], opts["persistent"], opts["timeout"]) == \
        ("rr", "", True, 120)
    ok(http("PATCH", "/service/svc", {"method": "wrr", "persistent": False}))
    assert e2e.kernel()[key] == {"sched": "wrr", "flags": "", "dests": {}}

    # PUT /service/<vs>/<rs>: every forwarding method, weights (omitted -> 100, GORB)
    backends = {
        "n1": ({"host": "10.77.60.1", "port": 8080, "method": "nat", "weight": 7},
               "10.77.60.1:8080", ("Masq", 7)),
        "d1": ({"host": "10.77.60.2", "port": 81, "method": "dr", "weight": 3},
               "10.77.60.2:81", ("Route", 3)),
        "t1": ({"host": "10.77.60.3", "port": 81, "method": "tunnel"},
               "10.77.60.3:81", ("Tunnel", 100)),
        "i1": ({"host": "10.77.60.4", "port": 81, "method": "IPIP", "weight": 2},
               "10.77.60.4:81", ("Tunnel", 2)),
    }
    for rs, (body, _, _) in backends.items():
        ok(http("PUT", f"/service/svc/{rs}", body))
    dests = {dest: entry for _, dest, entry in backends.values()}
    assert e2e.kernel()[key]["dests"] == dests
    info = get(e2e, "/service/svc")
    assert info["backends"] == sorted(backends) and info["health"] == 1

    one = get(e2e, "/service/svc/n1")
    assert {k: one["options"][k] for k in ("host", "port", "method", "weight")} == {
        "host": "10.77.60.1", "port": 8080, "method": "nat", "weight": 7}
    assert one["options"]["pulse"]["type"] == "none"
    metrics = one["metrics"]
    assert type(metrics["status"]) is int and metrics["status"] == 0  # GORB's integer: 0 = Up
    assert type(metrics["uptime"]) is int and metrics["health"] == 1
    assert metrics["status_name"] == "unknown"  # never checked (pulse none)
    assert one["address"] == "10.77.60.1" and one["stats"]["conns"] == 0
    assert get(e2e, "/service/svc/i1")["options"]["method"] == "ipip"  # lower-cased as GORB

    # PATCH /service/<vs>/<rs>: the weight, in the kernel and as GET's current weight
    ok(http("PATCH", "/service/svc/n1", {"weight": 0}))
    assert e2e.kernel()[key]["dests"]["10.77.60.1:8080"] == ("Masq", 0)
    assert get(e2e, "/service/svc/n1")["options"]["weight"] == 0
    ok(http("PATCH", "/service/svc/n1", {"weight": 42}))
    assert e2e.kernel()[key]["dests"]["10.77.60.1:8080"] == ("Masq", 42)
    assert get(e2e, "/service/svc/n1")["options"]["weight"] == 42

    # a PATCH of the service keeps its backends as they are
    ok(http("PATCH", "/service/svc", {"method": "wlc"}))
    assert e2e.kernel()[key] == {"sched": "wlc", "flags": "",
                                 "dests": {**dests, "10.77.60.1:8080": ("Masq", 42)}}

    # DELETE /service/<vs>/<rs>
    ok(http("DELETE", "/service/svc/d1"))
    assert "10.77.60.2:81" not in e2e.kernel()[key]["dests"]
    check_error(http("GET", "/service/svc/d1"), 404, MSG_NOT_FOUND)
    assert get(e2e, "/service/svc")["backends"] == ["i1", "n1", "t1"]

    # UDP (protocol lower-cased, as GORB) and the default VIP (host omitted: -i's address)
    ok(http("PUT", "/service/dns", {"host": VIP, "port": 53, "protocol": "UDP", "method": "rr"}))
    ok(http("PUT", "/service/dflt", {"port": 82, "pulse": NO_PULSE}))
    ok(http("PUT", "/service/dflt/a", {"host": "10.77.61.1", "port": 82, "weight": 9}))
    kernel = e2e.kernel()
    assert kernel[f"UDP {VIP}:53"] == {"sched": "rr", "flags": "", "dests": {}}
    assert kernel[f"TCP {CLIENT_GW}:82"] == {"sched": "wrr", "flags": "",
                                             "dests": {"10.77.61.1:82": ("Masq", 9)}}
    assert get(e2e, "/service/dns")["options"]["protocol"] == "udp"
    dflt = get(e2e, "/service/dflt")
    assert (dflt["options"]["host"], dflt["address"]) == ("", CLIENT_GW)  # GORB shows ""

    # DELETE /service/<vs> takes its backends with it
    for vs in ("svc", "dns", "dflt"):
        ok(http("DELETE", f"/service/{vs}"))
        check_error(http("GET", f"/service/{vs}"), 404, MSG_NOT_FOUND)
        check_error(http("GET", f"/service/{vs}/a"), 404, MSG_NOT_FOUND)
    kernel = e2e.kernel()
    assert not {key, f"UDP {VIP}:53", f"TCP {CLIENT_GW}:82"} & set(kernel), kernel
    assert not {"svc", "dns", "dflt"} & set(get(e2e, "/service"))


# --- GORB's error catalogue -----------------------------------------------------------------------

ERR_PORT = 8000
ERR_KEY = f"TCP {VIP}:{ERR_PORT}"
ERR_TABLE = {"sched": "wrr", "flags": "", "dests": {"10.77.50.1:80": ("Masq", 100)}}
BACKEND = {"host": "10.77.50.2", "port": 80}

ERRORS = [
    # (method, path, body, status, text; a text ending in "*" is a prefix)
    ("PUT", "/service/x", {"host": VIP}, 400, "endpoint information is missing"),
    ("PUT", "/service/x", {"host": VIP, "port": 0}, 400, "endpoint information is missing"),
    ("PUT", "/service/x", {"port": 8001, "protocol": "icmp"}, 400, "specified protocol is unknown"),
    ("PUT", "/service/x", {"port": 8001, "flags": "sh-port|nope"}, 400,
     "specified flag is unknown"),
    ("PUT", "/service/x", {"port": 8001, "flags": "sh-fallback|"}, 400,
     "specified flag is unknown"),
    ("PUT", "/service/x", {"host": VIP, "port": 8001, "method": "nosuch"}, 500,
     "error while calling into IPVS*"),
    ("PUT", "/service/errs", {"host": VIP, "port": ERR_PORT}, 409, MSG_EXISTS),
    ("PUT", "/service/other", {"host": VIP, "port": ERR_PORT}, 409, MSG_EXISTS + "*"),
    ("PUT", "/service/errs", {"host": VIP}, 400, "endpoint information is missing"),
    ("PUT", "/service/errs/b", {"host": "10.77.50.2"}, 400, "endpoint information is missing"),
    ("PUT", "/service/errs/b", {"port": 80}, 400, "endpoint information is missing"),
    ("PUT", "/service/errs/b", {**BACKEND, "method": "gateway"}, 400,
     "specified forwarding method is unknown"),
    ("PUT", "/service/errs/b", {**BACKEND, "pulse": {"type": "icmp"}}, 400,
     "specified pulse type is unknown"),
    ("PUT", "/service/errs/b", {**BACKEND, "pulse": {"interval": "60"}}, 400,
     "invalid interval format"),
    ("PUT", "/service/errs/b", {**BACKEND, "pulse": {"interval": "5 parsecs"}}, 400,
     "invalid interval format"),
    ("PUT", "/service/errs/b", {**BACKEND, "pulse": {"interval": "-5s"}}, 400,
     "pulse interval must be positive"),
    ("PUT", "/service/errs/b", {**BACKEND, "pulse": {"interval": "0s"}}, 400,
     "pulse interval must be positive"),
    ("PUT", "/service/errs/b", {**BACKEND, "pulse": {"type": "http",
                                                     "args": {"method": "BAD METHOD"}}}, 400,
     'net/http: invalid method "BAD METHOD"'),
    ("PUT", "/service/errs/b", {**BACKEND, "pulse": {"type": "http",
                                                     "args": {"expect": True}}}, 400, "*"),
    ("PUT", "/service/errs/c", {"host": "fd00::3", "port": 1}, 400,
     "incompatible address families"),
    ("PUT", "/service/errs/a", {"host": "10.77.50.9", "port": 1}, 409, MSG_EXISTS),
    ("PUT", "/service/errs/z", {"host": "10.77.50.1", "port": 80}, 409, MSG_EXISTS + "*"),
    ("PUT", "/service/nope/c", {"host": "10.77.50.3", "port": 1}, 404, MSG_NOT_FOUND),
    ("GET", "/service/nope", None, 404, MSG_NOT_FOUND),
    ("PATCH", "/service/nope", {"method": "rr"}, 404, MSG_NOT_FOUND),
    ("DELETE", "/service/nope", None, 404, MSG_NOT_FOUND),
    ("GET", "/service/errs/nope", None, 404, MSG_NOT_FOUND),
    ("GET", "/service/nope/a", None, 404, MSG_NOT_FOUND),  # backends are scoped to a service
    ("PATCH", "/service/errs/nope", {"weight": 1}, 404, MSG_NOT_FOUND),
    ("PATCH", "/service/nope/a", {"weight": 1}, 404, MSG_NOT_FOUND),
    ("DELETE", "/service/errs/nope", None, 404, MSG_NOT_FOUND),
    # fixed upstream bugs: a key change is refused (GORB had no PATCH /service), an omitted
    # weight is refused (GORB drained the backend to 0)
    ("PATCH", "/service/errs", {"port": 8002}, 400,
     "the service key (host, port, protocol, fwmark) cannot be changed in place*"),
    ("PATCH", "/service/errs", {"host": CLIENT_GW}, 400,
     "the service key (host, port, protocol, fwmark) cannot be changed in place*"),
    ("PATCH", "/service/errs", {"method": "nosuch"}, 500, "error while calling into IPVS*"),
    ("PATCH", "/service/errs/a", {}, 400, "weight is required"),
    ("PATCH", "/service/errs/a", {"host": "10.77.50.1"}, 400, "weight is required"),
    ("PATCH", "/service/errs/a", b"", 400, "EOF"),
    ("PUT", "/service/x", b'{"port": 80', 400, "Expecting*"),
    ("PUT", "/service/x", {"port": 70000}, 400, "Expected `int` <= 65535 - at `$.port`"),
    ("GET", "/services", None, 404, "404 page not found"),
    ("POST", "/service/errs", {}, 405, "method not allowed"),
]


@pytest.fixture(scope="module")
def errs(e2e):
    """Service ``errs`` (no health checks) with backend ``a``, for the error cases."""
    ok(e2e.gorb.http("PUT", "/service/errs", {"host": VIP, "port": ERR_PORT, "pulse": NO_PULSE}))
    ok(e2e.gorb.http("PUT", "/service/errs/a", {"host": "10.77.50.1", "port": 80}))
    assert e2e.kernel()[ERR_KEY] == ERR_TABLE
    return e2e


@pytest.mark.parametrize("method, path, body, status, text", ERRORS,
                         ids=[f"{c[0]} {c[1]} {c[3]} {c[4][:40]}" for c in ERRORS])
def test_gorb_error_status_and_text(errs, method, path, body, status, text):
    check_error(errs.gorb.http(method, path, body), status, text)


def test_refused_requests_changed_nothing(errs):
    """After the whole table: the kernel and the state are as ``errs`` made them."""
    kernel = errs.kernel()
    assert kernel[ERR_KEY] == ERR_TABLE
    assert not [k for k in kernel if k.endswith((":8001", ":8002"))], kernel
    listed = get(errs, "/service")
    assert "errs" in listed and not {"x", "other", "nope"} & set(listed), listed
    info = get(errs, "/service/errs")
    assert info["backends"] == ["a"] and info["options"]["port"] == ERR_PORT
    assert (info["options"]["method"], info["options"]["host"]) == ("wrr", VIP)
    assert get(errs, "/service/errs/a")["options"]["weight"] == 100  # not drained by PATCH {}


def test_numeric_pulse_args_work_and_check_a_real_server(errs):
    """GORB dropped the connection on ``"expect": 200`` (and any number in ``args``); here
    numbers and digit strings alike are accepted and the check runs against the real server."""
    http, topo = errs.gorb.http, errs.topo
    numeric = {"type": "http", "interval": "1s", "timeout": "1s",
               "args": {"path": "/", "expect": 200, "port": BACKEND_PORT}}
    digits = {**numeric, "args": {"path": "/", "expect": "200", "port": str(BACKEND_PORT)}}
    ok(http("PUT", "/service/errs/num", {"host": topo.addresses["b1"], "port": BACKEND_PORT,
                                         "pulse": numeric}))
    ok(http("PUT", "/service/errs/str", {"host": topo.addresses["b2"], "port": BACKEND_PORT,
                                         "pulse": digits}))
    # a status the server never answers with: the same check, down
    wrong = {**numeric, "args": {"path": "/", "expect": 204}}
    ok(http("PUT", "/service/errs/wrong", {"host": topo.addresses["b3"], "port": BACKEND_PORT,
                                           "pulse": wrong}))
    try:
        pulse = get(errs, "/service/errs/num")["options"]["pulse"]
        assert (pulse["type"], pulse["args"]["expect"]) == ("http", 200), pulse

        def statuses():
            return {rs: get(errs, f"/service/errs/{rs}")["metrics"]["status_name"]
                    for rs in ("num", "str", "wrong")}

        wait_until(statuses, 20.0, "checks", every=0.2,
                   until={"num": "up", "str": "up", "wrong": "down"}.__eq__)
        dests = errs.kernel()[ERR_KEY]["dests"]
        assert dests[f"{topo.addresses['b1']}:{BACKEND_PORT}"] == ("Masq", 100)
        assert dests[f"{topo.addresses['b2']}:{BACKEND_PORT}"] == ("Masq", 100)
        assert dests[f"{topo.addresses['b3']}:{BACKEND_PORT}"] == ("Masq", 0)
        wrong_metrics = get(errs, "/service/errs/wrong")["metrics"]
        assert (wrong_metrics["status"], wrong_metrics["health"]) == (1, 0)
        assert wrong_metrics["last_result"]["ok"] is False
    finally:
        for rs in ("num", "str", "wrong"):
            ok(http("DELETE", f"/service/errs/{rs}"))
    assert errs.kernel()[ERR_KEY] == ERR_TABLE


# --- real traffic ---------------------------------------------------------------------------------

WEB_KEY = f"TCP {VIP}:{VIP_PORT}"
WEB_PULSE = {"type": "http", "interval": "1s", "timeout": "1s", "slow_start": 2,
             "args": {"path": "/", "expect": 200}}


def restart_server(topo: Topology, name: str) -> None:
    """Start backend ``name``'s HTTP server again (``topology.build`` started the first)."""
    proc = subprocess.Popen(["ip", "netns", "exec", topo.backends[name], *PYTHON, SERVER, name,
                             str(BACKEND_PORT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    topo.servers.append(proc)
    assert _read_line(proc, 30.0, f"HTTP server {name}") == "listening"


def metric_samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def clean(result: dict) -> dict:
    assert result["failures"] == 0, result["errors"]
    return result["counts"]


def test_traffic_through_a_service_built_over_http(e2e):
    http, topo = e2e.gorb.http, e2e.topo
    dest = {name: f"{ip}:{BACKEND_PORT}" for name, ip in topo.addresses.items()}

    def weights() -> dict[str, tuple[str, int]]:
        return e2e.table().get(WEB_KEY, {})

    ok(http("PUT", "/service/web", {"host": VIP, "port": VIP_PORT, "method": "rr"}))
    for name, ip in topo.addresses.items():
        ok(http("PUT", f"/service/web/{name}", {"host": ip, "port": BACKEND_PORT,
                                                "pulse": WEB_PULSE}))
    try:
        every = {d: ("Masq", 100) for d in dest.values()}
        assert e2e.kernel()[WEB_KEY] == {"sched": "rr", "flags": "", "dests": every}
        wait_until(lambda: {n: get(e2e, f"/service/web/{n}")["metrics"]["status_name"]
                            for n in dest},
                   20.0, "all up", every=0.2, until=lambda s: set(s.values()) == {"up"})
        sent = 0
        assert clean(topo.requests(30)) == {"b1": 10, "b2": 10, "b3": 10}
        sent += 30

        # PATCH weight 0 drains b2; 100 brings it back
        ok(http("PATCH", "/service/web/b2", {"weight": 0}))
        assert e2e.kernel()[WEB_KEY]["dests"] == {**every, dest["b2"]: ("Masq", 0)}
        assert get(e2e, "/service/web/b2")["options"]["weight"] == 0
        assert clean(topo.requests(30)) == {"b1": 15, "b3": 15}
        sent += 30
        ok(http("PATCH", "/service/web/b2", {"weight": 100}))
        assert e2e.kernel()[WEB_KEY]["dests"] == every

        # b3's server stops: pulse drains it (weight 0 in the kernel) and traffic avoids it
        _stop(topo.servers[2])
        stopped = time.monotonic()
        wait_until(weights, 10.0, "b3 drained", every=0.05,
                   until=lambda w: w.get(dest["b3"]) == ("Masq", 0))
        print(f"b3 drained {time.monotonic() - stopped:.2f} s after its server stopped")
        assert e2e.kernel()[WEB_KEY]["dests"] == {**every, dest["b3"]: ("Masq", 0)}
        b3 = get(e2e, "/service/web/b3")
        assert b3["options"]["weight"] == 0
        assert (b3["metrics"]["status"], b3["metrics"]["status_name"]) == (1, "down")
        assert 0 <= b3["metrics"]["health"] < 1 and b3["metrics"]["uptime"] == 0
        assert get(e2e, "/service/web")["health"] < 1
        assert clean(topo.requests(20)) == {"b1": 10, "b2": 10}
        sent += 20

        # ... and comes back: slow start (2 checks) up to its weight
        restart_server(topo, "b3")
        back = time.monotonic()
        wait_until(weights, 20.0, "b3 back", every=0.05,
                   until=lambda w: w.get(dest["b3"]) == ("Masq", 100))
        print(f"b3 back at weight 100 {time.monotonic() - back:.2f} s after its server started")
        assert e2e.kernel()[WEB_KEY]["dests"] == every
        b3 = get(e2e, "/service/web/b3")["metrics"]
        assert (b3["status"], b3["status_name"]) == (0, "up")
        assert clean(topo.requests(30)) == {"b1": 10, "b2": 10, "b3": 10}
        sent += 30

        # /metrics: GORB's names and labels, and the kernel's counters of that traffic (its
        # estimator publishes them every 2 s, so poll)
        svc = frozenset({"name": "web", "host": VIP, "port": str(VIP_PORT),
                         "protocol": "tcp"}.items())

        def scrape() -> dict:
            reply = http("GET", "/metrics")
            assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain")
            return metric_samples(reply.raw.decode())

        samples = wait_until(
            scrape, 8.0, "connections counted", every=0.5,
            until=lambda s: s.get(("gorb_ipvs_service_connections_total", svc), 0) >= sent)
        assert samples[("gorb_ipvs_service_connections_total", svc)] == sent
        assert samples[("gorb_up", frozenset())] == 1
        assert samples[("gorb_service_backends", svc)] == 3
        assert 0 < samples[("gorb_service_health", svc)] < 1  # b3's window holds failures
        per_backend = 0.0
        for name, ip in topo.addresses.items():
            labels = frozenset({"service_name": "web", "name": name, "host": ip,
                                "port": str(BACKEND_PORT)}.items())
            assert samples[("gorb_service_backend_weight", labels)] == 100
            assert samples[("gorb_service_backend_status", labels)] == 0
            health = samples[("gorb_service_backend_health", labels)]
            assert health == 1 if name != "b3" else 0 < health < 1, (name, health)
            assert ("gorb_service_backend_uptime_seconds", labels) in samples
            assert samples[("gorb_ipvs_backend_packets_in_total", labels)] > 0
            per_backend += samples[("gorb_ipvs_backend_connections_total", labels)]
        assert per_backend == sent
        assert samples[("gorb_ipvs_service_bytes_out_total", svc)] > 0
        stats = get(e2e, "/service/web")["stats"]
        assert stats["conns"] == sent and stats["inpkts"] > 0, stats
    finally:
        ok(http("DELETE", "/service/web"))
    assert WEB_KEY not in e2e.kernel()
    assert not [k for k in metric_samples(http("GET", "/metrics").raw.decode())
                if dict(k[1]).get("name") == "web"]  # no stale series (GORB K kept them)


# --- restart of the API under writes -------------------------------------------------------------

RST_PORT = 90
RST_KEY = f"TCP {VIP}:{RST_PORT}"


@dataclass
class Writes:
    """What one client thread did and saw."""

    index: int
    confirmed: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # rs -> host, port, w
    unsure_put: dict[str, tuple[str, int, set[int]]] = field(default_factory=dict)
    unsure_weight: dict[str, set[int]] = field(default_factory=dict)
    refused: set[str] = field(default_factory=set)  # PUTs refused at connect: never applied
    errors: list[tuple[float, str]] = field(default_factory=list)  # connection errors
    wrong: list[str] = field(default_factory=list)  # anything but 200 / a connection error
    ok_at: list[float] = field(default_factory=list)  # times of 200s
    ops: int = 0


def client_loop(gorb: Gorb, w: Writes, stop: threading.Event) -> None:
    """PUT a new backend, PATCH its weight, GET it; over and over until ``stop``. A refused
    connection means the request never reached a server, so it must have changed nothing; a
    reset leaves its outcome open (both are accepted later); anything but a 200 or a connection
    error is a wrong answer."""
    i = 0
    while not stop.is_set():
        rs, host, port = f"c{w.index}n{i}", f"10.77.{100 + w.index}.{i % 250 + 1}", 1000 + i // 250
        w0, w1 = 10 + i % 7, 50 + i % 11
        i += 1

        def call(method: str, body: object = None) -> tuple[str, Reply | None]:
            """("ok", reply), ("refused" | "connection" | "wrong", None)."""
            w.ops += 1
            t0 = time.monotonic()
            try:
                reply = gorb.http(method, f"/service/rst/{rs}", body, timeout=10.0)
            except ConnectionError as exc:
                w.errors.append((t0, f"{method} {rs}: {exc!r}"))
                time.sleep(0.05)
                return "refused" if isinstance(exc, ConnectionRefusedError) else "connection", None
            except Exception as exc:  # a timeout, a broken response: wrong
                w.wrong.append(f"{method} {rs}: {exc!r}")
                return "wrong", None
            if reply.status != 200:
                w.wrong.append(f"{method} {rs}: {reply.status} {reply.raw[:200]!r}")
                return "wrong", None
            w.ok_at.append(time.monotonic())
            return "ok", reply

        outcome, _ = call("PUT", {"host": host, "port": port, "weight": w0})
        if outcome != "ok":
            if outcome == "connection":
                w.unsure_put[rs] = (host, port, {w0})
            elif outcome == "refused":
                w.refused.add(rs)
            continue
        w.confirmed[rs] = (host, port, w0)
        outcome, _ = call("PATCH", {"weight": w1})
        if outcome == "ok":
            w.confirmed[rs] = (host, port, w1)
        elif outcome == "connection":
            w.unsure_weight[rs] = {w0, w1}
        outcome, reply = call("GET")
        if reply is not None:
            opts = reply.json()["options"]
            want = w.unsure_weight.get(rs, {w.confirmed[rs][2]})
            if (opts["host"], opts["port"]) != (host, port) or opts["weight"] not in want:
                w.wrong.append(f"GET {rs}: {opts} (wanted {host}:{port} weight in {want})")


def test_api_restart_while_clients_write_loses_nothing(e2e):
    gorb, http = e2e.gorb, e2e.gorb.http
    ok(http("PUT", "/service/rst", {"host": VIP, "port": RST_PORT, "pulse": NO_PULSE}))
    clients = [Writes(i) for i in range(3)]
    stop = threading.Event()
    threads = [threading.Thread(target=client_loop, args=(gorb, w, stop), daemon=True)
               for w in clients]
    old_pid = gorb.pid("api")
    for t in threads:
        t.start()
    try:
        wait_until(lambda: min(len(w.ok_at) for w in clients), 30.0, "writes before the restart",
                   every=0.1, until=lambda n: n >= 10)
        restart_from = time.monotonic()
        out = gorb.ctl("restart", "api")
        ctl_done = time.monotonic()
        assert "api: stopped" in out and "api: started" in out, out
        # supervisord says RUNNING after startsecs (2 s), which in the guest can come before the
        # new API listens: the restart ends when the API answers again.
        gorb.wait_api()
        restart_to = time.monotonic()
        wait_until(lambda: min(sum(1 for t in w.ok_at if t > restart_to) for w in clients), 30.0,
                   "writes after the restart", every=0.1, until=lambda n: n >= 10)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=limit(30))
    assert gorb.pid("api") != old_pid

    wrong = [x for w in clients for x in w.wrong]
    errors = sorted(e for w in clients for e in w.errors)
    ops = sum(w.ops for w in clients)
    during = sum(1 for w in clients for t in w.ok_at if restart_from <= t <= restart_to)
    print(f"restart of api took {restart_to - restart_from:.2f} s (gorb ctl returned after "
          f"{ctl_done - restart_from:.2f} s); {ops} requests by "
          f"{len(clients)} clients, {len(errors)} connection errors, {during} answered 200 during "
          f"the restart; {sum(len(w.refused) for w in clients)} PUTs refused; unsure (reset): "
          f"{sum(len(w.unsure_put) for w in clients)} PUT, "
          f"{sum(len(w.unsure_weight) for w in clients)} PATCH")
    assert wrong == [], wrong[:10]
    late = [e for e in errors if not restart_from <= e[0] <= restart_to]
    assert late == [], late[:10]  # connection errors only while the API restarted

    # No state lost: every confirmed change is in GET and in the kernel; an unsure one either way.
    confirmed = {rs: v for w in clients for rs, v in w.confirmed.items()}
    unsure_put = {rs: v for w in clients for rs, v in w.unsure_put.items()}
    unsure_weight = {rs: ws for w in clients for rs, ws in w.unsure_weight.items()}
    refused = {rs for w in clients for rs in w.refused}
    listed = set(get(e2e, "/service/rst")["backends"])
    assert set(confirmed) <= listed, sorted(set(confirmed) - listed)[:10]
    assert listed <= set(confirmed) | set(unsure_put), sorted(listed - set(confirmed))[:10]
    assert not refused & listed, sorted(refused & listed)[:10]
    expected: dict[str, tuple[str, int, set[int]]] = {
        rs: (host, port, unsure_weight.get(rs, {weight}))
        for rs, (host, port, weight) in confirmed.items()}
    expected.update({rs: unsure_put[rs] for rs in listed - set(confirmed)})
    kernel = e2e.kernel()[RST_KEY]["dests"]
    assert set(kernel) == {f"{h}:{p}" for h, p, _ in expected.values()}
    bad = {rs: kernel[f"{h}:{p}"] for rs, (h, p, ws) in expected.items()
           if kernel[f"{h}:{p}"] not in {("Masq", x) for x in ws}}
    assert bad == {}, list(bad.items())[:10]
    # GET each backend whose outcome was open, and a sample of the others
    sample = sorted(set(unsure_weight) | (listed - set(confirmed))) + sorted(confirmed)[::25]
    for rs in sample:
        opts = get(e2e, f"/service/rst/{rs}")["options"]
        host, port, ws = expected[rs]
        assert (opts["host"], opts["port"]) == (host, port) and opts["weight"] in ws, (rs, opts)
    assert re.search(r"api\s+RUNNING", gorb.ctl("status"))
    ok(http("DELETE", "/service/rst"))
    assert RST_KEY not in e2e.kernel()
