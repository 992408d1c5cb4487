"""Tokens, roles and the audit log of the API in-process (WebTest) against a real WriterLoop on a
fake kernel (``test_api_wsgi.Harness``): each role against every operation of the OpenAPI
document, /health open, 401/403 and their headers, unknown routes, ``secret_file``, the warning
of an open API beyond loopback, and one audit line per state-changing request, refused ones
included, with no secret in the audit file or the logs."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import msgspec
import pytest

from gorb.common import config
from gorb.common.config import ApiToken
from gorb.common.store_messages import StoreStatus, SyncResult
from gorb.services.api import main as api_main
from gorb.services.api import openapi
from gorb.services.api.audit import AuditFile
from gorb.services.api.auth import load_tokens
from tests.service.test_api_support import short_rundir
from tests.service.test_api_wsgi import WEB_KEY, Harness, backend, web

pytestmark = pytest.mark.timeout(60)

ADMIN_SECRET = "adm-5ecret-Zq81"
READ_SECRET = "rd-5ecret-Pw07"
SECRETS = (ADMIN_SECRET, READ_SECRET)
TOKENS = {"deploy": ApiToken("admin", secret=ADMIN_SECRET),
          "grafana": ApiToken("read", secret=READ_SECRET)}
AS = {None: {}, "admin": {"Authorization": f"Bearer {ADMIN_SECRET}"},
      "read": {"Authorization": f"Bearer {READ_SECRET}"}}


class FakeDiscovery:
    """discovery's control socket: every store request succeeds, changing nothing."""

    def __init__(self):
        self.requests: list[str] = []

    def request(self, type_: str, body: dict) -> dict:
        self.requests.append(type_)
        data = SyncResult("ok") if type_ == "store.sync" else StoreStatus("ok", "file:///s")
        return {"ok": True, "errno": "ok", "reason": "", "data": msgspec.to_builtins(data)}


@pytest.fixture
def make(tmp_path):
    """Harnesses with tokens (default ``TOKENS``), a fake discovery and the audit file
    ``tmp_path / "audit.log"`` (``h.audit_path``)."""
    with contextlib.ExitStack() as stack:

        def make(tokens=TOKENS) -> Harness:
            rundir = stack.enter_context(short_rundir())
            h = Harness(rundir, Path(rundir) / "state.json", tokens=load_tokens(tokens),
                        discovery=FakeDiscovery(), audit_file=AuditFile(str(tmp_path / "audit.log")))
            stack.callback(h.close)
            h.audit_path = tmp_path / "audit.log"
            return h

        yield make


@pytest.fixture
def h(make):
    harness = make()
    web(harness_as(harness, "admin"))
    backend(harness_as(harness, "admin"))
    return harness


class harness_as:
    """A Harness whose calls carry one role's token (for ``web``/``backend`` of test_api_wsgi)."""

    def __init__(self, h: Harness, role: str | None):
        self.h, self.role = h, role

    def call(self, method, path, body=None, status=None):
        return self.h.call(method, path, body, headers=AS[self.role])


def audit_lines(h) -> list[dict]:
    if not h.audit_path.exists():
        return []
    return [json.loads(line) for line in h.audit_path.read_text().splitlines()]


# --- every operation, every role ------------------------------------------------------------------

BODIES = {("put", "/service/{vs}"): {"host": "10.0.0.9", "port": 81},
          ("patch", "/service/{vs}"): {"method": "rr"},
          ("put", "/service/{vs}/{rs}"): {"host": "10.1.0.2", "port": 8080},
          ("patch", "/service/{vs}/{rs}"): {"weight": 5}}


def operations() -> list[tuple[str, str]]:
    doc = openapi.document(auth=True)
    return [(method, path) for path, item in doc["paths"].items()
            for method in item if method != "parameters"]


def concrete(method: str, path: str) -> str:
    """The operation on the fixture's objects: PUT creates new ones, the rest use web / web/a."""
    new = method == "put"
    return path.replace("{vs}", "new" if new and path == "/service/{vs}" else "web") \
        .replace("{rs}", "b" if new else "a")


def mutating(method: str, path: str) -> bool:
    return method not in ("get", "head") or path == "/store/sync"


@pytest.mark.parametrize("role", [None, "read", "admin"])
@pytest.mark.parametrize("method, path", operations())
def test_each_role_against_every_documented_operation(h, role, method, path):
    before = h.kernel.snapshot()
    resp = h.call(method.upper(), concrete(method, path), BODIES.get((method, path)),
                  headers=AS[role])
    if path == "/health":
        want = 200
    elif role is None:
        want = 401
    elif role == "read" and mutating(method, path):
        want = 403
    else:
        want = 200  # the route's own answer to these requests (checked below)
    assert resp.status_int == want, (resp.status, resp.body)
    if want >= 400:
        assert resp.content_type == "application/json" and set(resp.json) == {"error"}
        assert h.kernel.snapshot() == before  # refused: nothing changed
        assert resp.headers["WWW-Authenticate"].startswith('Bearer realm="gorb"')
        assert ('error="insufficient_scope"' in resp.headers["WWW-Authenticate"]) == (want == 403)
    else:
        assert "WWW-Authenticate" not in resp.headers
    if mutating(method, path) and want == 200:
        assert h.kernel.snapshot() != before or path == "/store/sync"
    lines = audit_lines(h)[2:]  # after the fixture's own two
    if mutating(method, path):
        assert [(l["method"], l["status"], l["token"]) for l in lines] == \
            [(method.upper(), want, {None: None, "read": "grafana", "admin": "deploy"}[role])]
    else:
        assert lines == []


def test_the_admin_answers_are_the_routes_own():
    """What an admin gets is what the open API answers: the same statuses for the same calls."""
    answers = {}
    for tokens in ({}, TOKENS):
        with short_rundir() as rundir:
            h = Harness(rundir, Path(rundir) / "state.json",
                        tokens=load_tokens(tokens), discovery=FakeDiscovery())
            try:
                as_admin = harness_as(h, "admin")
                web(as_admin)
                backend(as_admin)
                answers[bool(tokens)] = [
                    as_admin.call(m.upper(), concrete(m, p), BODIES.get((m, p))).status_int
                    for m, p in operations()]
            finally:
                h.close()
    assert answers[True] == answers[False]
    assert answers[True].count(200) >= 10  # in order: what a DELETE removed is a 404 after


# --- the rules in detail --------------------------------------------------------------------------

def test_health_is_open_and_says_auth_on(h):
    resp = h.call("GET", "/health")
    assert (resp.status_int, resp.json) == (200, {"api": "ok", "writer": "ok", "auth": "on"})
    assert h.call("HEAD", "/health").status_int == 200


def test_no_token_is_a_401_with_the_challenge(h):
    resp = h.call("GET", "/service")
    assert resp.status_int == 401
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="gorb"'
    assert resp.json == {"error": "authentication required: send Authorization: Bearer <token>"}


@pytest.mark.parametrize("header", [f"Bearer {ADMIN_SECRET}x", f"Bearer {ADMIN_SECRET[:-1]}",
                                    "Bearer", f"Bearer {READ_SECRET} {ADMIN_SECRET}"])
def test_a_wrong_token_is_a_401_invalid_token(h, header):
    resp = h.call("GET", "/service", headers={"Authorization": header})
    assert resp.status_int == 401
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="gorb", error="invalid_token"'
    assert resp.json == {"error": "invalid token"}


def test_another_scheme_is_no_token(h):
    resp = h.call("GET", "/service", headers={"Authorization": "Basic ZGVwbG95Og=="})
    assert (resp.status_int, resp.headers["WWW-Authenticate"]) == (401, 'Bearer realm="gorb"')


def test_a_read_token_may_not_change_anything(h):
    resp = h.call("PATCH", "/service/web/a", {"weight": 0}, headers=AS["read"])
    assert resp.status_int == 403
    assert resp.json == {"error": "token 'grafana' has role read: PATCH /service/<vs>/<rs> needs "
                                  "admin"}
    assert h.kernel.snapshot()[WEB_KEY].dests[("10.1.0.1", 8080)].weight == 100


@pytest.mark.parametrize("method, path", [("GET", "/nope"), ("PUT", "/service/web/a/b"),
                                          ("GET", "/service/"), ("PUT", "/health"),
                                          ("POST", "/service")])
def test_unknown_routes_are_401_unauthenticated_and_404_or_405_authenticated(h, method, path):
    assert h.call(method, path).status_int == 401  # no route is revealed
    for role in ("read", "admin"):
        resp = h.call(method, path, headers=AS[role])
        assert resp.status_int == (405 if method in ("POST",) or path == "/health" else 404)
        assert resp.content_type == "application/json" and set(resp.json) == {"error"}


def test_the_secret_never_reaches_the_routes(h, monkeypatch):
    seen = {}
    real = h.api.list_services

    def spy():
        import bottle
        seen.update(bottle.request.environ)
        return real()

    # bottle bound the route's callback at build time: swap it in the route itself
    route = next(r for r in h.api.app.routes if r.rule == "/service" and r.method == "GET")
    monkeypatch.setattr(route, "callback", spy)
    route.reset()
    assert h.call("GET", "/service", headers=AS["admin"]).status_int == 200
    assert seen and "HTTP_AUTHORIZATION" not in seen
    assert not any(s in repr(seen) for s in SECRETS)


def test_tokens_from_secret_files(make, tmp_path):
    (tmp_path / "ci.token").write_text("from-a-file-Tq3\n")
    os.chmod(tmp_path / "ci.token", 0o600)
    h = make(tokens={"ci": ApiToken("admin", secret_file=str(tmp_path / "ci.token"))})
    resp = h.call("PUT", "/service/web", {"host": "10.0.0.1", "port": 80},
                  headers={"Authorization": "Bearer from-a-file-Tq3"})
    assert resp.status_int == 200, resp.body
    assert audit_lines(h)[-1]["token"] == "ci"
    assert h.call("GET", "/service",
                  headers={"Authorization": "Bearer from-a-file-Tq3x"}).status_int == 401


def test_the_document_declares_the_bearer_scheme(h):
    doc = h.call("GET", "/openapi.json", headers=AS["read"]).json
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert doc["security"] == [{"bearer": []}]
    assert doc["paths"]["/health"]["get"]["security"] == []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters" or path == "/health":
                continue
            assert {"401", "403"} <= set(op["responses"]), (path, method)
            assert op["responses"]["401"]["content"]["application/json"]["schema"] == \
                {"$ref": "#/components/schemas/Error"}
    assert "security" not in openapi.document(auth=False)


# --- no tokens ------------------------------------------------------------------------------------

def test_without_tokens_the_api_is_open_and_says_auth_off(make):
    h = make(tokens={})
    assert h.call("GET", "/health").json["auth"] == "off"
    assert h.call("PUT", "/service/web", {"host": "10.0.0.1", "port": 80}).status_int == 200
    assert audit_lines(h)[-1]["token"] is None


@pytest.mark.parametrize("listen, tokens, warned", [
    (":4672", {}, True), ("0.0.0.0:4672", {}, True), ("[::]:4672", {}, True),
    ("10.1.2.3:4672", {}, True), ("gorb.example:4672", {}, True),
    ("127.0.0.1:4672", {}, False), ("[::1]:4672", {}, False), ("localhost:4672", {}, False),
    (":4672", TOKENS, False),
])
def test_an_open_api_beyond_loopback_logs_one_warning(caplog, listen, tokens, warned):
    with caplog.at_level(logging.WARNING, logger="api"):
        got, tls, audit_file = api_main.secure(config.ApiSection(listen=listen, tokens=tokens))
    assert (tls, audit_file) == (None, None) and bool(got) == bool(tokens)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == int(warned), warnings
    if warned:
        assert "no [api.tokens] configured" in warnings[0] and listen in warnings[0]


# --- the audit log --------------------------------------------------------------------------------

def test_an_audit_line_for_every_state_changing_request_refused_ones_included(h, caplog):
    caplog.set_level(logging.DEBUG)
    admin, read = AS["admin"], AS["read"]
    calls = [
        ("PUT", "/service/api", {"host": "10.0.0.2", "port": 443}, admin, 200),
        ("PATCH", "/service/web/a", {"Weight": 7, "host": "ignored"}, admin, 200),
        ("DELETE", "/service/web", None, admin, 200),
        ("DELETE", "/service/api", None, {}, 401),
        ("DELETE", "/service/api", None, {"Authorization": f"Bearer {ADMIN_SECRET}!"}, 401),
        ("PUT", "/service/x", {"port": 80}, read, 403),
        ("PUT", "/service/x", b'{"port": "80", "pad": "' + b"p" * 500 + b'"}', admin, 400),
        ("PUT", "/service/-bad", {"port": 80}, admin, 400),
        ("DELETE", "/service/nope", None, admin, 404),
        ("PUT", "/service/api", {"host": "10.0.0.2", "port": 443}, admin, 409),
        ("PUT", "/service/bad", {"host": "10.0.0.3", "port": 1, "method": "nosuch"}, admin, 500),
        ("PUT", "/no/such/route", {}, admin, 404),
        ("GET", "/store/sync?force=true", None, admin, 200),
        ("GET", "/service/api", None, admin, 200),  # a read: no line
    ]
    for method, path, body, headers, status in calls:
        resp = h.call(method, path, body, headers=headers)
        assert resp.status_int == status, (method, path, resp.body)
    h.stop_writer()
    assert h.call("DELETE", "/service/api", headers=admin).status_int == 503
    h.start_writer()
    lines = audit_lines(h)[2:]
    assert [(l["method"], l["status"]) for l in lines] == \
        [(m, s) for m, path, _, _, s in calls if m != "GET" or "store" in path] + \
        [("DELETE", 503)]
    assert all(list(l) == ["time", "token", "peer", "method", "route", "ids", "body", "raw",
                           "status", "error", "change"] for l in lines)
    assert all(l["peer"] == "192.0.2.7" and l["time"].endswith("Z") for l in lines)
    put, patch, delete, no_token, bad_token, weak, invalid, bad_id, missing, exists, kernel, \
        no_route, sync, unavailable = lines
    assert (put["token"], put["route"], put["ids"], put["error"]) == \
        ("deploy", "/service/<vs>", {"vs": "api"}, None)
    assert put["body"]["host"] == "10.0.0.2" and put["body"]["method"] == "wrr"  # normalised
    assert put["change"] == {"/service/api": {"before": None, "after": {  # as the writer stores it
        "options": {**put["body"], "family": "ipv4"}, "address": "10.0.0.2"}}}
    assert patch["body"] == {"weight": 7} and patch["ids"] == {"vs": "web", "rs": "a"}
    assert (patch["change"]["/service/web/a"]["before"]["options"]["weight"],
            patch["change"]["/service/web/a"]["after"]["options"]["weight"]) == (100, 7)
    assert delete["change"]["/service/web"]["after"] is None
    assert delete["change"]["/service/web/a"] == {
        "before": patch["change"]["/service/web/a"]["after"], "after": None}
    assert (no_token["token"], no_token["error"], no_token["route"]) == \
        (None, "authentication required: send Authorization: Bearer <token>", "/service/<vs>")
    assert (bad_token["token"], bad_token["error"]) == (None, "invalid token")
    assert (weak["token"], weak["body"], weak["change"]) == ("grafana", None, None)
    assert weak["error"].startswith("token 'grafana' has role read")
    assert invalid["body"] is None and invalid["raw"]["bytes"] == 525
    assert len(invalid["raw"]["head"]) == 64 and "p" * 100 not in json.dumps(invalid)
    assert invalid["error"] == "Expected `int`, got `str` - at `$.port`"
    assert bad_id["ids"] == {"vs": "-bad"} and bad_id["error"].startswith("invalid object id")
    assert missing["error"] == "unable to locate specified object" and missing["change"] is None
    assert exists["error"] == "specified object already exists" and exists["body"] is not None
    assert kernel["error"].startswith("error while calling into IPVS") and \
        kernel["change"] is None
    assert (no_route["route"], no_route["ids"], no_route["error"]) == \
        (None, {}, "404 page not found")
    assert (sync["route"], sync["body"], sync["error"]) == ("/store/sync", {"force": True}, None)
    assert "did not answer" in unavailable["error"]
    text = h.audit_path.read_text() + caplog.text
    assert not any(s in text for s in SECRETS), "a secret was logged"


def test_the_audit_file_is_reopened_after_logrotate_moved_it(h):
    h.audit_path.rename(h.audit_path.with_suffix(".log.1"))  # logrotate (create: a new file)
    h.audit_path.write_text("")
    assert h.call("DELETE", "/service/web/a", headers=AS["admin"]).status_int == 200
    h.audit_path.with_suffix(".log.1").rename(h.audit_path.with_suffix(".log.2"))
    h.audit_path.unlink()  # removed, nothing created: the API creates it
    assert h.call("DELETE", "/service/web", headers=AS["admin"]).status_int == 200
    assert [l["route"] for l in audit_lines(h)] == ["/service/<vs>"]
    rotated = h.audit_path.with_suffix(".log.2").read_text().splitlines()
    assert len(rotated) == 2  # the fixture's lines, before the rotation


def test_lines_go_on_into_the_moved_file_until_a_new_one_can_be_opened(h, monkeypatch):
    # the API may not create files in a log dir of root's: between logrotate's move and its
    # "create", opening the path fails; the line goes to the moved file, not lost
    moved = h.audit_path.with_suffix(".log.1")
    h.audit_path.rename(moved)
    real_open = os.open

    def refuse(path, *args, **kw):
        if str(path) == str(h.audit_path):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kw)

    monkeypatch.setattr(os, "open", refuse)
    assert h.call("DELETE", "/service/web/a", headers=AS["admin"]).status_int == 200
    assert json.loads(moved.read_text().splitlines()[-1])["route"] == "/service/<vs>/<rs>"
    monkeypatch.setattr(os, "open", real_open)
    h.audit_path.write_text("")  # logrotate's create
    assert h.call("DELETE", "/service/web", headers=AS["admin"]).status_int == 200
    assert [l["route"] for l in audit_lines(h)] == ["/service/<vs>"]
    assert len(moved.read_text().splitlines()) == 3  # the fixture's two and the one above


def test_an_audit_write_error_is_logged_and_the_request_answered(h, caplog, tmp_path):
    h.audit_path.unlink()
    os.mkdir(h.audit_path)  # cannot be opened as a file
    with caplog.at_level(logging.ERROR, logger="api"):
        resp = h.call("DELETE", "/service/web/a", headers=AS["admin"])
    assert resp.status_int == 200 and resp.body == b""
    assert any("cannot write the audit log" in r.getMessage() for r in caplog.records)
    os.rmdir(h.audit_path)
    assert h.call("DELETE", "/service/web", headers=AS["admin"]).status_int == 200
    assert [l["route"] for l in audit_lines(h)] == ["/service/<vs>"]  # writing again


def test_an_audit_file_that_cannot_be_opened_is_a_config_error(tmp_path):
    with pytest.raises(config.ConfigError, match="api.audit_log: cannot open .*No such file"):
        api_main.secure(config.ApiSection(listen="127.0.0.1:1",
                                          audit_log=str(tmp_path / "no" / "audit.log")))
