"""The API app in-process (WebTest) against a REAL ``WriterLoop`` over ipc:// in a thread, on a fake
kernel: every route, every GORB error text and status (gorb-spec §2.9, Appendix B), the bugs fixed
on purpose (§8), 404/405/trailing slashes, the writer going away and coming back, /health,
/metrics, and the OpenAPI document against the routes."""

from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

import jsonschema_rs
import pytest
import webob
import webtest
import zmq.green
from prometheus_client.parser import text_string_to_metric_families

from gorb.common.model import BackendOptions, ServiceOptions
from gorb.services.api import app as app_module
from gorb.services.api import openapi, views
from gorb.services.api.app import build
from gorb.common.resolver import resolve_host
from gorb.services.api.writer_client import WriterClient
from gorb.services.ipvs_writer import state
from tests.pace import limit
from tests.service.test_api_support import DEVICE_ADDRESS, StatsKernel, WriterThread, short_rundir

pytestmark = pytest.mark.timeout(60)

WEB_KEY = (2, 6, "10.0.0.1", 80, 0)
NAMES = {"web.example": [(socket.AF_INET6, "fd00::80"), (socket.AF_INET, "10.0.0.80")],
         "backend.example": [(socket.AF_INET, "10.1.0.99")],
         "v6.example": [(socket.AF_INET6, "fd00::1:1")]}


def fake_getaddrinfo(host, port, family, kind):
    if host not in NAMES:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return [(fam, kind, 6, "", (addr, 0)) for fam, addr in NAMES[host]]


class Harness:
    """``build_args``: more arguments of ``build`` (tokens, an audit file, a discovery client)."""

    def __init__(self, rundir: str, state_file: Path, **build_args):
        self.rundir = rundir
        self.kernel = StatsKernel(schedulers={"rr", "wrr", "lc", "wlc", "sh", "mh"})
        self.writer = WriterThread(rundir, state_file, self.kernel)
        self.ctx = zmq.green.Context()
        self.client = WriterClient(self.ctx, self.writer.endpoint, timeout=limit(0.5))
        self.api, wsgi = build(self.client,
                               resolve=lambda h: resolve_host(h, getaddrinfo=fake_getaddrinfo),
                               **build_args)
        self.app = webtest.TestApp(wsgi, extra_environ={"REMOTE_ADDR": "192.0.2.7"})
        self.writer_running = True

    def call(self, method: str, path: str, body=None, status=None,
             headers: dict[str, str] | None = None) -> webtest.TestResponse:
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        kwargs = {"expect_errors": True, "headers": headers or {}}
        if data is not None:
            kwargs["params"] = data
        return getattr(self.app, method.lower())(path, **kwargs)

    def stop_writer(self) -> None:
        self.writer.stop()
        self.writer_running = False

    def start_writer(self) -> None:
        self.writer.start()
        self.writer_running = True

    def close(self) -> None:
        self.client.close()
        self.ctx.destroy(linger=0)
        if self.writer_running:
            self.writer.stop()


@pytest.fixture
def h(tmp_path):
    with short_rundir() as rundir:
        harness = Harness(rundir, tmp_path / "state.json")
        try:
            yield harness
        finally:
            harness.close()


def ok(resp: webtest.TestResponse) -> None:
    """GORB's success for PUT/PATCH/DELETE: 200, empty body, no Content-Type."""
    assert (resp.status_int, resp.body) == (200, b""), resp.body
    assert "Content-Type" not in resp.headers


def err(resp: webtest.TestResponse, status: int, text: str | None = None,
        startswith: str | None = None) -> str:
    assert resp.status_int == status, (resp.status, resp.body)
    assert resp.content_type == "application/json"
    body = json.loads(resp.body)
    assert set(body) == {"error"}
    if text is not None:
        assert body["error"] == text
    if startswith is not None:
        assert body["error"].startswith(startswith), body["error"]
    return body["error"]


def get(h: Harness, path: str):
    resp = h.call("GET", path)
    assert resp.status_int == 200, resp.body
    assert resp.content_type == "application/json"
    return json.loads(resp.body)


def web(h: Harness, **opts) -> None:
    ok(h.call("PUT", "/service/web", {"host": "10.0.0.1", "port": 80, **opts}))


def backend(h: Harness, rs="a", vs="web", host="10.1.0.1", port=8080, **opts) -> None:
    ok(h.call("PUT", f"/service/{vs}/{rs}", {"host": host, "port": port, **opts}))


# --- services ------------------------------------------------------------------------------------

def test_service_lifecycle(h):
    assert get(h, "/service") == []
    web(h)
    ok(h.call("PUT", "/service/api", {"host": "10.0.0.2", "port": 443}))
    assert get(h, "/service") == ["api", "web"]
    info = get(h, "/service/web")
    assert info == {
        "options": {**info["options"], "host": "10.0.0.1", "port": 80, "protocol": "tcp",
                    "method": "wrr", "flags": "", "persistent": False},
        "health": 1.0, "backends": [], "address": "10.0.0.1", "stats": None}
    assert WEB_KEY in h.kernel.snapshot()
    ok(h.call("DELETE", "/service/web"))
    assert get(h, "/service") == ["api"]
    assert WEB_KEY not in h.kernel.snapshot()
    err(h.call("GET", "/service/web"), 404, "unable to locate specified object")


def test_get_responses_are_gorbs_tab_indented_json(h):
    web(h)
    body = h.call("GET", "/service/web").body
    assert body.startswith(b'{\n\t"options": {\n\t\t"host": "10.0.0.1"')
    assert not body.endswith(b"\n")


def test_keys_are_matched_case_insensitively_and_unknown_keys_ignored(h):
    ok(h.call("PUT", "/service/web", {"HOST": "10.0.0.1", "Port": 80, "PROTOCOL": "UDP",
                                      "whatever": {"x": 1}}))
    info = get(h, "/service/web")
    assert (info["options"]["port"], info["options"]["protocol"]) == (80, "udp")
    assert (2, 17, "10.0.0.1", 80, 0) in h.kernel.snapshot()


def test_a_service_without_host_uses_the_device_address_and_shows_host_empty(h):
    ok(h.call("PUT", "/service/dflt", {"port": 8000}))
    info = get(h, "/service/dflt")
    assert (info["options"]["host"], info["address"]) == ("", DEVICE_ADDRESS)
    assert (2, 6, DEVICE_ADDRESS, 8000, 0) in h.kernel.snapshot()


def test_a_host_name_is_resolved_once_ipv4_first_and_kept_as_given(h):
    ok(h.call("PUT", "/service/named", {"host": "web.example", "port": 80}))
    info = get(h, "/service/named")
    assert (info["options"]["host"], info["address"]) == ("web.example", "10.0.0.80")
    assert (2, 6, "10.0.0.80", 80, 0) in h.kernel.snapshot()


def test_the_default_resolver_uses_gevents_getaddrinfo():
    assert resolve_host("localhost") in ("127.0.0.1", "::1")  # /etc/hosts: no DNS needed


def test_service_stats_come_from_the_kernel(h):
    web(h)
    h.kernel.stats[WEB_KEY] = {"conns": 5, "inpkts": 6, "outpkts": 7, "inbytes": 8,
                               "outbytes": 9}
    assert get(h, "/service/web")["stats"] == {"conns": 5, "inpkts": 6, "outpkts": 7,
                                               "inbytes": 8, "outbytes": 9}


def test_patch_service_changes_options_in_place(h):
    """GORB's README promised PATCH /service/<vs>; upstream never built it (§8.10)."""
    web(h)
    backend(h)
    ok(h.call("PATCH", "/service/web", {"METHOD": "rr", "flags": ""}))
    info = get(h, "/service/web")
    assert info["options"]["method"] == "rr"
    assert info["backends"] == ["a"]
    assert h.kernel.snapshot()[WEB_KEY].sched == "rr"
    assert set(h.kernel.snapshot()[WEB_KEY].dests) == {("10.1.0.1", 8080)}
    ok(h.call("PATCH", "/service/web", {}))  # nothing to change is fine


@pytest.mark.parametrize("change, field", [({"port": 81}, "port"), ({"host": "10.0.0.2"}, "host"),
                                           ({"protocol": "udp"}, "protocol")])
def test_patch_service_refuses_a_key_change(h, change, field):
    web(h)
    text = err(h.call("PATCH", "/service/web", change), 400)
    assert "cannot be changed" in text and field in text
    assert get(h, "/service/web")["options"]["port"] == 80
    assert WEB_KEY in h.kernel.snapshot()


def test_patch_service_errors(h):
    err(h.call("PATCH", "/service/web", {"method": "rr"}), 404,
        "unable to locate specified object")
    web(h)
    err(h.call("PATCH", "/service/web", b""), 400, "EOF")
    err(h.call("PATCH", "/service/web", b"null"), 400)
    err(h.call("PATCH", "/service/web", {"flags": "nope"}), 400, "specified flag is unknown")
    err(h.call("PATCH", "/service/web", {"persistent": "yes"}), 400)
    err(h.call("PATCH", "/service/web", {"method": "nosuch"}), 500,
        startswith="error while calling into IPVS: ")
    assert get(h, "/service/web")["options"]["method"] == "wrr"


# --- backends ------------------------------------------------------------------------------------

def test_backend_lifecycle(h):
    web(h)
    backend(h, "a", weight=0)  # <= 0 on create means 100 (GORB)
    backend(h, "b", host="10.1.0.2", weight=7, method="dr")
    assert get(h, "/service/web")["backends"] == ["a", "b"]
    info = get(h, "/service/web/a")
    assert info["options"]["host"] == "10.1.0.1"
    assert info["options"]["port"] == 8080
    assert info["options"]["weight"] == 100
    assert info["options"]["method"] == "nat"
    # not checked yet (no pulse worker here): GORB's initial pulse metrics
    assert info["metrics"] == {"status": 0, "status_name": "unknown", "health": 1.0,
                               "uptime": 0, "last_check": None, "last_result": None,
                               "checks": 0, "consecutive_passes": 0,
                               "consecutive_failures": 0, "held_in": False}
    assert info["address"] == "10.1.0.1"
    assert get(h, "/service/web/b")["options"]["method"] == "dr"
    dests = h.kernel.snapshot()[WEB_KEY].dests
    assert (dests[("10.1.0.1", 8080)].weight, dests[("10.1.0.2", 8080)].weight) == (100, 7)
    ok(h.call("DELETE", "/service/web/a"))
    err(h.call("GET", "/service/web/a"), 404, "unable to locate specified object")
    assert set(h.kernel.snapshot()[WEB_KEY].dests) == {("10.1.0.2", 8080)}
    ok(h.call("DELETE", "/service/web"))  # takes its backends along
    err(h.call("GET", "/service/web/b"), 404, "unable to locate specified object")


def test_a_backend_shows_the_kernels_weight_and_dest_stats(h):
    web(h)
    backend(h)
    h.kernel.dest_stats[(WEB_KEY, ("10.1.0.1", 8080))] = {"conns": 3, "activeconns": 2,
                                                          "inactconns": 1}
    h.kernel.edit(lambda t: setattr(t[WEB_KEY].dests[("10.1.0.1", 8080)], "weight", 33))
    info = get(h, "/service/web/a")
    assert info["options"]["weight"] == 33  # what the kernel has now
    assert info["stats"] == {"conns": 3, "activeconns": 2, "inactconns": 1}


def test_a_backend_host_name_is_resolved(h):
    web(h)
    backend(h, "named", host="backend.example")
    info = get(h, "/service/web/named")
    assert (info["options"]["host"], info["address"]) == ("backend.example", "10.1.0.99")


def test_expect_200_as_a_number_works(h):
    """GORB panicked and dropped the connection on a numeric pulse arg (§2.5, §8.1)."""
    web(h)
    backend(h, "b", pulse={"type": "http", "args": {"expect": 200, "port": 8081}})
    backend(h, "c", host="10.1.0.3",
            pulse={"type": "http", "interval": "5s", "args": {"path": "/hc", "expect": "204"}})
    assert get(h, "/service/web/b")["options"]["pulse"]["args"] == {"expect": 200, "port": 8081}
    assert get(h, "/service/web/c")["options"]["pulse"]["args"]["expect"] == 204


def test_patch_backend_sets_the_weight(h):
    web(h)
    backend(h)
    ok(h.call("PATCH", "/service/web/a", {"weight": 10}))
    assert get(h, "/service/web/a")["options"]["weight"] == 10
    assert h.kernel.snapshot()[WEB_KEY].dests[("10.1.0.1", 8080)].weight == 10
    ok(h.call("PATCH", "/service/web/a", {"Weight": 0, "host": "ignored"}))  # drain, on purpose
    assert h.kernel.snapshot()[WEB_KEY].dests[("10.1.0.1", 8080)].weight == 0


def test_patch_backend_without_weight_is_a_400_not_a_drain(h):
    """GORB set the weight to 0 when the body had none (§2.7)."""
    web(h)
    backend(h, weight=50)
    err(h.call("PATCH", "/service/web/a", {}), 400, "weight is required")
    err(h.call("PATCH", "/service/web/a", {"host": "10.1.0.1"}), 400, "weight is required")
    err(h.call("PATCH", "/service/web/a", {"weight": "10"}), 400)
    err(h.call("PATCH", "/service/web/a", {"weight": -1}), 400)
    assert h.kernel.snapshot()[WEB_KEY].dests[("10.1.0.1", 8080)].weight == 50


def test_backend_ids_are_scoped_to_their_service(h):
    """GORB K kept backends in one global map and ignored vsID (§8.11)."""
    web(h)
    ok(h.call("PUT", "/service/api", {"host": "10.0.0.2", "port": 443}))
    backend(h, "a", vs="web")
    backend(h, "a", vs="api", host="10.1.0.5", port=8443)
    assert get(h, "/service/web/a")["options"]["host"] == "10.1.0.1"
    assert get(h, "/service/api/a")["options"]["host"] == "10.1.0.5"
    ok(h.call("DELETE", "/service/api/a"))
    assert get(h, "/service/web/a")["options"]["host"] == "10.1.0.1"
    err(h.call("PATCH", "/service/api/a", {"weight": 1}), 404, "unable to locate specified object")
    err(h.call("GET", "/service/nope/a"), 404, "unable to locate specified object")


# --- GORB's error catalogue ---------------------------------------------------------------------

WITH_WEB = "web"
CATALOGUE = [
    # (setup, method, path, body, status, exact text or None, text prefix or None)
    (None, "PUT", "/service/x", {"host": "10.0.0.1"}, 400, "endpoint information is missing"),
    (None, "PUT", "/service/x", {"host": "10.0.0.1", "port": 0}, 400,
     "endpoint information is missing"),
    (None, "PUT", "/service/x", {"port": 80, "protocol": "icmp"}, 400,
     "specified protocol is unknown"),
    (None, "PUT", "/service/x", {"port": 80, "flags": "sh-port|nope"}, 400,
     "specified flag is unknown"),
    (None, "PUT", "/service/x", {"port": 80, "flags": "SH-PORT"}, 400, "specified flag is unknown"),
    (None, "PUT", "/service/x", {"host": "nosuch.example", "port": 80}, 400,
     "lookup nosuch.example: no such host"),
    (None, "PUT", "/service/x", {"host": "10.0.0.9", "port": 81, "method": "nosuch"}, 500,
     "error while calling into IPVS: *"),
    (None, "PUT", "/service/nope/c", {"host": "10.1.0.3", "port": 1}, 404,
     "unable to locate specified object"),
    (None, "GET", "/service/nope", None, 404, "unable to locate specified object"),
    (None, "DELETE", "/service/nope", None, 404, "unable to locate specified object"),
    (None, "PATCH", "/service/nope", {"method": "rr"}, 404, "unable to locate specified object"),
    (WITH_WEB, "PUT", "/service/web", {"host": "10.0.0.1", "port": 80}, 409,
     "specified object already exists"),
    (WITH_WEB, "PUT", "/service/other", {"host": "10.0.0.1", "port": 80}, 409,
     "specified object already exists*"),
    (WITH_WEB, "PUT", "/service/web", {"host": "10.0.0.1"}, 400,
     "endpoint information is missing"),   # validation before the 409, as in GORB
    (WITH_WEB, "PUT", "/service/web/b", {"host": "10.1.0.2"}, 400,
     "endpoint information is missing"),
    (WITH_WEB, "PUT", "/service/web/b", {"port": 80}, 400, "endpoint information is missing"),
    (WITH_WEB, "PUT", "/service/web/b", {"host": "10.1.0.2", "port": 80, "method": "gateway"},
     400, "specified forwarding method is unknown"),
    (WITH_WEB, "PUT", "/service/web/b",
     {"host": "10.1.0.2", "port": 80, "pulse": {"type": "icmp"}}, 400,
     "specified pulse type is unknown"),
    (WITH_WEB, "PUT", "/service/web/b",
     {"host": "10.1.0.2", "port": 80, "pulse": {"interval": "60"}}, 400,
     "invalid interval format"),
    (WITH_WEB, "PUT", "/service/web/b",
     {"host": "10.1.0.2", "port": 80, "pulse": {"interval": "-5s"}}, 400,
     "pulse interval must be positive"),
    (WITH_WEB, "PUT", "/service/web/b",
     {"host": "10.1.0.2", "port": 80, "pulse": {"interval": "0s"}}, 400,
     "pulse interval must be positive"),
    (WITH_WEB, "PUT", "/service/web/b",
     {"host": "10.1.0.2", "port": 80, "pulse": {"args": {"method": "BAD METHOD"}}}, 400,
     'net/http: invalid method "BAD METHOD"'),
    (WITH_WEB, "PUT", "/service/web/c", {"host": "fd00::3", "port": 1}, 400,
     "incompatible address families"),
    (WITH_WEB, "PUT", "/service/web/c", {"host": "v6.example", "port": 1}, 400,
     "incompatible address families"),
    (WITH_WEB, "PUT", "/service/web/c", {"host": "nosuch.example", "port": 1}, 400,
     "lookup nosuch.example: no such host"),
    (WITH_WEB, "PUT", "/service/web/a", {"host": "10.1.0.9", "port": 1}, 409,
     "specified object already exists"),
    (WITH_WEB, "PUT", "/service/web/z", {"host": "10.1.0.1", "port": 8080}, 409,
     "specified object already exists*"),
    (WITH_WEB, "GET", "/service/web/nope", None, 404, "unable to locate specified object"),
    (WITH_WEB, "PATCH", "/service/web/nope", {"weight": 1}, 404,
     "unable to locate specified object"),
    (WITH_WEB, "DELETE", "/service/web/nope", None, 404, "unable to locate specified object"),
    (WITH_WEB, "PUT", "/service/web/b", b"", 400, "EOF"),
    (WITH_WEB, "PUT", "/service/x", b"", 400, "EOF"),
    (WITH_WEB, "PATCH", "/service/web/a", b"", 400, "EOF"),
    (WITH_WEB, "PUT", "/service/x", b'{"port": 80', 400, "Expecting*"),
    (WITH_WEB, "PUT", "/service/x", b"[80]", 400, "json: cannot unmarshal array into*"),
    (WITH_WEB, "PUT", "/service/x", {"port": "80"}, 400, "Expected `int`, got `str` - at `$.port`"),
    (WITH_WEB, "PUT", "/service/x", {"port": 70000}, 400, "Expected `int` <= 65535 - at `$.port`"),
    (WITH_WEB, "PUT", "/service/web/b",
     {"host": "10.1.0.2", "port": 80, "pulse": {"args": {"expect": True}}}, 400, None),
]


@pytest.mark.parametrize("setup, method, path, body, status, text", CATALOGUE,
                         ids=[f"{c[1]} {c[2]} {c[5]}" for c in CATALOGUE])
def test_gorbs_error_catalogue(h, setup, method, path, body, status, text):
    if setup == WITH_WEB:
        web(h)
        backend(h, "a")
    before = h.kernel.snapshot()
    resp = h.call(method, path, body)
    if text is not None and text.endswith("*"):
        err(resp, status, startswith=text[:-1])
    else:
        err(resp, status, text)
    assert h.kernel.snapshot() == before  # a refused request changes nothing


# --- routing --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path", [
    ("GET", "/"), ("GET", "/nope"), ("GET", "/services"), ("GET", "/service/"),
    ("GET", "/service/web/"), ("GET", "/service/web/a/"), ("PUT", "/service/web/a/b"),
    ("GET", "/service/a%2Fb/c/d"), ("DELETE", "/service//a"),
])
def test_an_unknown_path_is_a_json_404(h, method, path):
    web(h)
    err(h.call(method, path), 404, "404 page not found")


@pytest.mark.parametrize("method, path, allow", [
    ("POST", "/service", "GET"),
    ("PUT", "/service", "GET"),
    ("POST", "/service/web", "DELETE,GET,PATCH,PUT"),
    ("POST", "/service/web/a", "DELETE,GET,PATCH,PUT"),
    ("DELETE", "/metrics", "GET"),
    ("PUT", "/health", "GET"),
])
def test_a_wrong_method_is_a_json_405_with_allow(h, method, path, allow):
    resp = h.app.request(path, method=method, expect_errors=True)
    err(resp, 405, "method not allowed")
    assert resp.headers["Allow"] == allow


@pytest.mark.parametrize("vs", ["-web", "a%20b", "x" * 129, "caf%C3%A9", "%2E%2E"])
def test_an_invalid_object_id_is_a_400(h, vs):
    text = err(h.call("PUT", f"/service/{vs}", {"host": "10.0.0.1", "port": 80}), 400)
    assert text.startswith("invalid object id")
    err(h.call("GET", f"/service/web/{vs}"), 400)


def test_a_body_over_the_limit_is_a_413(h):
    big = b'{"port": 80, "pad": "' + b"x" * (1 << 20) + b'"}'
    err(h.call("PUT", "/service/big", big), 413, startswith="request body over")
    err(h.call("PUT", "/service/big/a", big), 413)
    err(h.call("PATCH", "/service/big", big), 413)
    err(h.call("GET", "/service/big"), 404)  # nothing was created


def test_a_bug_is_a_logged_500_internal_error_never_a_traceback(h, monkeypatch, caplog):
    web(h)

    def boom(view, now):
        raise KeyError("bug")

    monkeypatch.setattr(views, "service_info", boom)
    with caplog.at_level(logging.ERROR, logger="api"):
        resp = h.call("GET", "/service/web")
    err(resp, 500, "internal error")
    assert b"Traceback" not in resp.body and b"KeyError" not in resp.body
    assert any("KeyError" in (r.exc_text or "") for r in caplog.records)
    assert get(h, "/service") == ["web"]  # and the next request is served


def test_a_bug_outside_the_routes_is_a_500_too(h, monkeypatch):
    def boom(*_a, **_k):
        raise RuntimeError("outside")

    monkeypatch.setattr(h.api.app.router, "match", boom)
    resp = h.call("GET", "/service")
    err(resp, 500, "internal error")
    assert b"outside" not in resp.body


# --- the writer going away ------------------------------------------------------------------------

WRITER_ROUTES = [
    ("GET", "/service", None), ("GET", "/service/web", None), ("DELETE", "/service/web", None),
    ("PUT", "/service/web", {"host": "10.0.0.1", "port": 80}),
    ("PATCH", "/service/web", {"method": "rr"}),
    ("PUT", "/service/web/a", {"host": "10.1.0.1", "port": 8080}),
    ("GET", "/service/web/a", None), ("PATCH", "/service/web/a", {"weight": 1}),
    ("DELETE", "/service/web/a", None),
]


@pytest.mark.parametrize("method, path, body", WRITER_ROUTES)
def test_no_writer_is_a_503_and_a_restarted_writer_serves_again(h, method, path, body):
    web(h)
    backend(h)
    h.stop_writer()
    text = err(h.call(method, path, body), 503)
    assert "did not answer" in text
    h.start_writer()  # same endpoint, state from the state file; the API was not restarted
    resp = h.call(method, path, body)
    assert resp.status_int in (200, 409), resp.body
    assert get(h, "/service") == ["web"] or method == "DELETE"


def test_health_both_ways(h):
    assert get(h, "/health") == {"api": "ok", "writer": "ok", "auth": "off"}
    h.stop_writer()
    resp = h.call("GET", "/health")
    assert resp.status_int == 503
    body = json.loads(resp.body)
    assert (body["api"], body["writer"]) == ("ok", "unavailable")
    h.start_writer()
    assert get(h, "/health") == {"api": "ok", "writer": "ok", "auth": "off"}


def test_a_late_reply_is_not_given_to_the_next_request(h, monkeypatch):
    """A reply that arrives after its request gave up (503) is dropped, not delivered to a later
    request: the writer is slowed down past the client's timeout for one request."""
    web(h)
    real_read = h.writer.engine.read
    slow = {"on": True}

    def read(type_, body, pinned=None):
        if slow["on"] and type_ == "service.get":
            slow["on"] = False
            time.sleep(h.client.timeout + 0.3)  # past the client's timeout
        return real_read(type_, body, pinned)

    h.writer.engine.read = read
    err(h.call("GET", "/service/web"), 503)
    assert get(h, "/service") == ["web"]  # not the late ServiceView
    assert get(h, "/service/web")["address"] == "10.0.0.1"
    assert h.client.stale_replies == 1


# --- /metrics -------------------------------------------------------------------------------------

def scrape(h):
    resp = h.call("GET", "/metrics")
    assert resp.status_int == 200
    assert resp.content_type == "text/plain"
    samples = {}
    for family in text_string_to_metric_families(resp.body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def L(**labels):
    return tuple(sorted(labels.items()))


def test_metrics_after_creating_services(h):
    web(h)
    ok(h.call("PUT", "/service/dflt", {"port": 53, "protocol": "udp"}))
    backend(h, "a", weight=100)
    backend(h, "b", host="10.1.0.2", weight=20)
    ok(h.call("PATCH", "/service/web/a", {"weight": 60}))
    h.kernel.stats[WEB_KEY] = {"conns": 11, "inpkts": 12, "outpkts": 13, "inbytes": 14,
                               "outbytes": 15}
    h.kernel.dest_stats[(WEB_KEY, ("10.1.0.1", 8080))] = {
        "conns": 1, "inpkts": 2, "outpkts": 3, "inbytes": 4, "outbytes": 5, "activeconns": 6,
        "inactconns": 7, "persistconns": 0}
    s = scrape(h)
    websvc = L(name="web", host="10.0.0.1", port="80", protocol="tcp")
    dflt = L(name="dflt", host="", port="53", protocol="udp")
    a = L(service_name="web", name="a", host="10.1.0.1", port="8080")
    b = L(service_name="web", name="b", host="10.1.0.2", port="8080")
    assert s[("gorb_up", ())] == 1
    assert s[("gorb_service_backends", websvc)] == 2
    assert s[("gorb_service_backends", dflt)] == 0
    assert s[("gorb_service_health", websvc)] == 1
    assert s[("gorb_service_health", dflt)] == 1
    assert (s[("gorb_service_backend_weight", a)], s[("gorb_service_backend_weight", b)]) == \
        (60, 20)
    assert s[("gorb_service_backend_status", a)] == 0
    assert s[("gorb_service_backend_health", a)] == 1
    assert s[("gorb_service_backend_uptime_seconds", a)] == 0
    assert s[("gorb_ipvs_service_connections_total", websvc)] == 11
    assert s[("gorb_ipvs_service_packets_in_total", websvc)] == 12
    assert s[("gorb_ipvs_service_bytes_out_total", websvc)] == 15
    assert s[("gorb_ipvs_backend_connections_total", a)] == 1
    assert s[("gorb_ipvs_backend_bytes_in_total", a)] == 4
    assert s[("gorb_ipvs_backend_active_connections", a)] == 6
    assert s[("gorb_ipvs_backend_inactive_connections", a)] == 7
    ok(h.call("DELETE", "/service/web"))
    s = scrape(h)
    assert ("gorb_service_backends", websvc) not in s
    assert ("gorb_service_backend_weight", a) not in s


def test_metrics_without_a_writer_still_answer_with_gorb_up_0(h):
    web(h)
    h.stop_writer()
    s = scrape(h)
    assert s[("gorb_up", ())] == 0
    assert not any(name.startswith("gorb_service") for name, _ in s)
    assert any(name.startswith("process_") for name, _ in s)


@pytest.fixture
def cached(tmp_path):
    """A harness whose /metrics body lives a minute (``metrics_ttl``)."""
    with short_rundir() as rundir:
        harness = Harness(rundir, tmp_path / "state.json", metrics_ttl=60.0)
        try:
            yield harness
        finally:
            harness.close()


DEST_A = (WEB_KEY, ("10.1.0.1", 8080))


def _dest_stats(conns):
    return {"conns": conns, "inpkts": 2, "outpkts": 3, "inbytes": 4, "outbytes": 5,
            "activeconns": 6, "inactconns": 7, "persistconns": 0}


def test_metrics_is_one_body_for_its_ttl_and_a_new_or_deleted_object_drops_it(cached):
    h = cached
    web(h)
    backend(h, "a")
    h.kernel.dest_stats[DEST_A] = _dest_stats(1)
    first = h.call("GET", "/metrics")
    h.kernel.dest_stats[DEST_A] = _dest_stats(9)  # the kernel moved
    ok(h.call("PATCH", "/service/web/a", {"weight": 7}))  # a PATCH: within the ttl
    again = h.call("GET", "/metrics")
    assert again.body == first.body  # the same body: request counters included
    assert int(again.headers["Content-Length"]) == len(again.body)
    backend(h, "b", host="10.1.0.2")  # a new series: dropped
    s = scrape(h)
    a = L(service_name="web", name="a", host="10.1.0.1", port="8080")
    assert (s[("gorb_service_backend_weight", a)], s[("gorb_ipvs_backend_connections_total", a)]) \
        == (7, 9)
    assert ("gorb_service_backend_weight", L(service_name="web", name="b", host="10.1.0.2",
                                              port="8080")) in s
    ok(h.call("DELETE", "/service/web/b"))
    assert not any(dict(labels).get("name") == "b" for _, labels in scrape(h))


def test_metrics_in_gzip_for_a_scraper_that_asks_as_prometheus_does(cached):
    import gzip

    h = cached
    web(h)
    backend(h, "a")
    plain = h.call("GET", "/metrics")
    assert "Content-Encoding" not in plain.headers and plain.headers["Vary"] == "Accept-Encoding"
    backend(h, "b", host="10.1.0.2")  # a new body: rendered with its compressed copy
    # straight to the WSGI app: webtest would undo the encoding
    zipped = webob.Request.blank("/metrics", headers={"Accept-Encoding": "gzip, deflate"},
                                 remote_addr="192.0.2.7").get_response(h.app.app)
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert int(zipped.headers["Content-Length"]) == len(zipped.body)
    assert gzip.decompress(zipped.body) == h.call("GET", "/metrics").body


def test_metrics_without_a_ttl_is_rendered_at_every_scrape(tmp_path):
    with short_rundir() as rundir:
        h = Harness(rundir, tmp_path / "state.json", metrics_ttl=0.0)
        try:
            web(h)
            backend(h, "a")
            a = L(service_name="web", name="a", host="10.1.0.1", port="8080")
            for conns in (1, 2):
                h.kernel.dest_stats[DEST_A] = _dest_stats(conns)
                assert scrape(h)[("gorb_ipvs_backend_connections_total", a)] == conns
        finally:
            h.close()


def test_the_writers_part_of_metrics_is_what_the_state_dump_renders(h):
    """Through the route, at a size where the sort orders and the counters matter: the text
    before the process's own collectors equals prometheus_client's from ``state.dump``."""
    from prometheus_client import CollectorRegistry, generate_latest

    from gorb.services.api.metrics import families

    web(h)
    ok(h.call("PUT", "/service/dns", {"host": "10.0.0.53", "port": 53, "protocol": "udp"}))
    for i in range(120):
        backend(h, f"b{(i * 37) % 120}", host=f"10.1.{i // 200}.{i % 200 + 1}", weight=i % 50)
    for i in range(0, 120, 3):
        h.kernel.dest_stats[(WEB_KEY, (f"10.1.{i // 200}.{i % 200 + 1}", 8080))] = \
            _dest_stats(i * 10**9)
    h.kernel.stats[WEB_KEY] = {"conns": 11, "inpkts": 12, "outpkts": 13, "inbytes": 14,
                               "outbytes": 15}
    body = h.call("GET", "/metrics").body
    now = time.time()
    dump = h.client.request("state.dump", {"stats": True})["data"]["services"]
    reg = CollectorRegistry(auto_describe=False)

    class Fixed:
        def collect(self):
            return families(dump, now)

    reg.register(Fixed())
    want = generate_latest(reg)
    assert body[:len(want)] == want
    assert body[len(want):].startswith(b"# HELP process_")


def test_the_apis_own_requests_are_counted_by_route_pattern_and_timed(h):
    web(h)
    backend(h, "a")
    backend(h, "b", host="10.1.0.2")
    err(h.call("PUT", "/service/web/a", {"host": "10.1.0.1", "port": 8080}), 409)
    h.call("GET", "/no/such/path")
    s = scrape(h)
    count = "gorb_api_requests_total"
    assert s[(count, L(method="PUT", route="/service/<vs>", code="200"))] == 1
    assert s[(count, L(method="PUT", route="/service/<vs>/<rs>", code="200"))] == 2
    assert s[(count, L(method="PUT", route="/service/<vs>/<rs>", code="409"))] == 1
    assert s[(count, L(method="GET", route="", code="404"))] == 1
    hist = L(method="PUT", route="/service/<vs>/<rs>")
    assert s[("gorb_api_request_duration_seconds_count", hist)] == 3
    assert 0 < s[("gorb_api_request_duration_seconds_sum", hist)] < 5
    assert not any(v.startswith("/service/web") for _, labels in s for _, v in labels), \
        "raw paths (ids) must never become label values"


# --- the OpenAPI document -------------------------------------------------------------------------

def _route_table(h) -> set[tuple[str, str]]:
    out = set()
    for route in h.api.app.routes:
        path = route.rule
        for name in ("vs", "rs"):
            path = path.replace(f"<{name}>", "{" + name + "}")
        out.add((path, route.method.lower()))
    return out


def test_the_openapi_document_lists_exactly_the_routes(h):
    doc = get(h, "/openapi.json")
    assert doc["openapi"].startswith("3.1")
    documented = {(path, method) for path, item in doc["paths"].items()
                  for method in item if method != "parameters"}
    routes = _route_table(h)
    assert routes - documented == set(), "routes missing from the document"
    assert documented - routes == set(), "documented operations without a route"
    for path, item in doc["paths"].items():
        params = {p["name"] for p in item.get("parameters", [])}
        assert params == {n.strip("{}") for n in path.split("/") if n.startswith("{")}, path
        for method, op in item.items():
            if method == "parameters":
                continue
            for status, resp in op["responses"].items():
                if int(status) >= 400 and not (path == "/health" and status == "503"):
                    schema = resp["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (path, method, status)
            if method in ("put", "patch"):
                assert "requestBody" in op and {"400", "413"} <= set(op["responses"])


def test_the_document_has_every_model_field(h):
    doc = get(h, "/openapi.json")
    schemas = doc["components"]["schemas"]
    assert set(ServiceOptions.__struct_fields__) <= set(schemas["ServiceCreate"]["properties"])
    assert set(BackendOptions.__struct_fields__) <= set(schemas["BackendCreate"]["properties"])
    assert doc == json.loads(json.dumps(openapi.document()))


def _validator(doc, name):
    return jsonschema_rs.Draft202012Validator({"$ref": f"#/components/schemas/{name}",
                                               "components": doc["components"]})


def test_responses_match_their_documented_schemas(h):
    doc = get(h, "/openapi.json")
    web(h)
    backend(h, pulse={"type": "http", "args": {"expect": 200}})
    h.kernel.stats[WEB_KEY] = {"conns": 1}
    for path, name in [("/service", "ServiceList"), ("/service/web", "ServiceInfo"),
                       ("/service/web/a", "BackendInfo"), ("/health", "Health")]:
        body = get(h, path)
        errors = [e.message for e in _validator(doc, name).iter_errors(body)]
        assert errors == [], (path, errors)
    error = _validator(doc, "Error")
    for method, path in [("GET", "/service/nope"), ("GET", "/nope"), ("POST", "/service")]:
        assert error.is_valid(json.loads(h.call(method, path).body))
    assert not error.is_valid({"message": "x"})  # the validator does reject
    create = _validator(doc, "ServiceCreate")
    assert create.is_valid({"port": 80}) and not create.is_valid({"port": "80"})


def test_state_survives_in_the_file_the_writer_persists(h, tmp_path):
    web(h)
    backend(h)
    assert set(state.load(tmp_path / "state.json")) == {"web"}


def test_the_app_module_has_no_state_between_apps(h):
    """Stateless: a second app on the same writer sees the same objects."""
    web(h)
    _, wsgi = build(h.client)
    other = webtest.TestApp(wsgi)
    assert json.loads(other.get("/service").body) == ["web"]
    assert app_module.MAX_BODY == 1 << 20


def test_a_state_file_that_cannot_be_written_is_a_500_saying_so(h):
    """The writer's errno ``state`` (its file system refused the state file): a 500 with the
    writer's reason; nothing changed, and the API and writer go on serving."""
    web(h)

    def full(services):
        raise OSError(28, "No space left on device", "/var/lib/gorb/state.json.tmp")

    real, h.writer.engine.persist = h.writer.engine.persist, full
    resp = h.call("PUT", "/service/web/b", {"host": "10.1.0.2", "port": 80})
    err(resp, 500, "cannot save the desired state ([Errno 28] No space left on device: "
                   "'/var/lib/gorb/state.json.tmp'); nothing was changed")
    h.writer.engine.persist = real
    assert get(h, "/service/web")["backends"] == []
    assert h.call("PUT", "/service/web/b", {"host": "10.1.0.2", "port": 80}).status_int == 200
