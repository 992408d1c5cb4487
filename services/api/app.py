"""The REST API's routes: GORB's (gorb-spec §2.2) plus PATCH /service/<vs>, /health, /metrics,
/openapi.json and qk4l's /store/sync and /store/sync/status. Each route validates what it can
without state, sends one request to the writer (the store routes: to discovery's control socket,
``discovery_client``) and turns the reply into a response; the app keeps nothing between requests.

Responses:

    PUT / PATCH / DELETE   200 with an empty body (GORB), no Content-Type
    GET                    200 JSON (GORB's tab-indented shapes, ``views``)
    GET /store/sync[?force=true]   200 discovery's SyncResult {"status": "ok" | "partial",
                           "applied", "errors", "refused": null}; 400 the sync was refused (the
                           safety rule) or ``force`` is not a boolean; 404 no store configured
                           (known from ``[discovery]``, without asking discovery); 503 discovery
                           not running or not answering, or the writer or Consul not answering it
    GET /store/sync/status 200 discovery's StoreStatus (a dry run); 404 / 503 as above
    errors                 {"error": "<text>"} with the status of ``gorb.common.errors.HTTP_STATUS``:
                           400 invalid, 404 unknown object, 409 exists, 500 kernel or
                           state file, 503 no writer;
                           404 unknown path, 405 known path with another method (with Allow),
                           413 body over ``max_body`` bytes, 408 body not received within
                           ``api.idle_timeout``, 500 ``internal error`` for a bug

This module is the one choke point where exceptions become responses: a ``GorbError`` becomes its
status and text, ``PeerUnavailable`` (the writer or discovery did not answer) a 503, anything
else is logged with its traceback and answered 500 ``internal error`` — never a traceback on the
wire, never a dropped connection.

In front of the routes (``build``): ``auth`` (bearer tokens: 401/403 before any route runs) and
``audit`` (one JSON line per state-changing request, for which the routes ``note`` the body as
validated and the change the writer reports).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import bottle
import msgspec
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.registry import CollectorRegistry

from gorb.common import errors
from gorb.common.errors import GorbError
from gorb.common.validation import validate_backend, validate_object_id, validate_service
from gorb.common.resolver import Resolver, is_ip, resolve_host
from gorb.common.transport import PeerUnavailable
from gorb.services.api import audit, openapi, views
from gorb.services.api.audit import Audit, AuditFile, note
from gorb.services.api.auth import Authenticate, Tokens
from gorb.services.api.discovery_client import DiscoveryClient
from gorb.services.api.metrics import RequestMetrics, Scrapes, WriterMetrics
from gorb.services.api.writer_client import WriterClient, WriterUnavailable

log = logging.getLogger("api")
access_log = logging.getLogger("api.access")

MAX_BODY = 1 << 20  # bytes; GORB had no limit (gorb-spec §8.22)
JSON = "application/json"
MSG_INTERNAL = "internal error"
MSG_NO_ROUTE = "404 page not found"
# Changes that add or remove /metrics series: a scrape after one never shows the old set.
# Other changes (a weight, a service's options) show within the body's ttl (``metrics``).
SERIES_CHANGES = frozenset({"service.create", "service.delete", "backend.create",
                            "backend.delete"})  # GORB's (gorilla/mux) text for an unknown path


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    """The body did not arrive within the connection's idle timeout (``gorb.services.api.server``)."""


def _json(status: int, value: Any, **headers: str) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(views.encode(value), status, {"Content-Type": JSON, **headers})


def _error(status: int, text: str, **headers: str) -> bottle.HTTPResponse:
    return _json(status, {"error": text}, **headers)


def _done() -> bottle.HTTPResponse:
    return bottle.HTTPResponse(b"", 200)


def read_body(environ: dict, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes; ``BodyTooLarge`` beyond, without reading it all.

    Read from ``wsgi.input`` directly: gevent's server has already undone chunked encoding, which
    bottle's own reader would try to undo a second time."""
    stream = environ.get("wsgi.input")
    if stream is None:
        return b""
    length = environ.get("CONTENT_LENGTH") or ""
    if length.strip():
        try:
            n = int(length)
        except ValueError:
            raise GorbError(errors.INVALID, f"bad Content-Length {length!r}") from None
        if n > limit:
            raise BodyTooLarge()
        return _read(stream, n) if n > 0 else b""
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        data = _read(stream, limit + 1)
        if len(data) > limit:
            raise BodyTooLarge()
        return data
    return b""


def _read(stream: Any, n: int) -> bytes:
    try:
        return stream.read(n)
    except TimeoutError:
        raise BodyTimeout() from None


class Api:
    """The routes, bound to one writer client; ``app`` is the bottle application."""

    def __init__(self, client: WriterClient, resolve: Resolver = resolve_host,
                 max_body: int = MAX_BODY, discovery: DiscoveryClient | None = None,
                 auth: bool = False, metrics_ttl: float = 1.0):
        """``metrics_ttl``: seconds a /metrics body is served again (``writer.stats_interval``;
        0: render at every scrape)."""
        self.client = client
        self.auth = auth  # tokens configured (``auth.Authenticate`` in front): /health says so
        self.discovery = discovery  # None: no store configured, the store routes answer 404
        self.resolve = resolve
        self.max_body = max_body
        # the process's own collectors; the writer's part comes first, from ``WriterMetrics``
        self.registry = CollectorRegistry(auto_describe=False)
        self.writer_metrics = WriterMetrics(client)
        self.scrapes = Scrapes(self._render_metrics, metrics_ttl)
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        self.app = app = bottle.Bottle(catchall=True)
        app.config["json.enable"] = False
        app.default_error_handler = self._bottle_error
        app.install(self._guard)
        app.route("/service", "GET", self.list_services)
        app.route("/service/<vs>", "PUT", self.create_service)
        app.route("/service/<vs>", "GET", self.get_service)
        app.route("/service/<vs>", "PATCH", self.update_service)
        app.route("/service/<vs>", "DELETE", self.delete_service)
        app.route("/service/<vs>/<rs>", "PUT", self.create_backend)
        app.route("/service/<vs>/<rs>", "GET", self.get_backend)
        app.route("/service/<vs>/<rs>", "PATCH", self.update_backend)
        app.route("/service/<vs>/<rs>", "DELETE", self.delete_backend)
        app.route("/health", "GET", self.health)
        app.route("/metrics", "GET", self.metrics)
        app.route("/openapi.json", "GET", self.openapi)
        app.route("/store/sync", "GET", self.store_sync)
        app.route("/store/sync/status", "GET", self.store_status)
        self._openapi = views.encode(openapi.document(auth=auth))

    # the choke point ---------------------------------------------------------------------------

    def _guard(self, callback: Callable) -> Callable:
        """Bottle plugin around every route: exceptions -> JSON error responses."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return callback(*args, **kwargs)
            except bottle.HTTPResponse:
                raise
            except GorbError as err:
                return _error(views.status_of(err), err.reason)
            except PeerUnavailable as exc:  # the writer or discovery
                log.warning("%s %s: %s", bottle.request.method, bottle.request.path, exc)
                return _error(errors.HTTP_STATUS[errors.UNAVAILABLE], str(exc))
            except BodyTooLarge:
                return _error(413, f"request body over {self.max_body} bytes")
            except BodyTimeout:
                log.info("%s %s: body not received within the idle timeout",
                         bottle.request.method, bottle.request.path)
                return _error(408, "request body not received within the idle timeout",
                              Connection="close")
            except Exception:
                log.exception("internal error in %s %s", bottle.request.method,
                              bottle.request.path)
                return _error(500, MSG_INTERNAL)

        return wrapper

    @staticmethod
    def _bottle_error(err: bottle.HTTPError) -> bytes:
        """Bottle's own errors (no route, wrong method, a crash outside a route) as JSON."""
        bottle.response.content_type = JSON
        if err.status_code == 404:
            return views.encode({"error": MSG_NO_ROUTE})
        if err.status_code == 405:
            return views.encode({"error": "method not allowed"})
        if err.traceback:
            log.error("internal error: %s", err.traceback)
        return views.encode({"error": MSG_INTERNAL if err.status_code >= 500 else err.body})

    def _ask(self, type_: str, body: dict[str, Any], client: Any = None) -> Any:
        """The data of the writer's (or ``client``'s) reply; a refusal raises it as a
        GorbError."""
        reply = (client or self.client).request(type_, body)
        if not reply["ok"]:
            errno = reply["errno"] if reply["errno"] in errors.HTTP_STATUS else errors.INTERNAL
            raise GorbError(errno, reply["reason"])
        return reply["data"]

    def _mutate(self, type_: str, body: dict[str, Any]) -> None:
        """Ask the writer for a change; what it changed goes to the audit line."""
        try:
            data = self._ask(type_, body)
        finally:
            if type_ in SERIES_CHANGES:
                self.scrapes.invalidate()  # no scrape shows a deleted object, or misses a new one
        note(change=data.get("change") if isinstance(data, dict) else None)

    def _body(self) -> bytes:
        data = read_body(bottle.request.environ, self.max_body)
        note(raw=audit.raw_of(data))  # logged only if it does not validate
        return data

    # services ----------------------------------------------------------------------------------

    def list_services(self) -> Any:
        return _json(200, self._ask("service.list", {})["services"])

    def create_service(self, vs: str) -> Any:
        vs = validate_object_id(vs)
        opts = views.decode_service(self._body())
        # GORB's checks before the name lookup: a bad body costs no DNS query (gorb-spec §2.3).
        validate_service(opts)
        note(body=_wire(opts))
        address = ""
        if opts.host and not is_ip(opts.host):
            address = self.resolve(opts.host)
        self._mutate("service.create", {"service": vs, "options": _wire(opts),
                                        "address": address})
        where = address or opts.host or "<device address>"
        log.info("creating virtual service [%s] on %s:%d", vs, where, opts.port)
        return _done()

    def get_service(self, vs: str) -> Any:
        vs = validate_object_id(vs)
        view = self._ask("service.get", {"service": vs, "summary": True})
        return _json(200, views.service_info(view, time.time()))

    def update_service(self, vs: str) -> Any:
        vs = validate_object_id(vs)
        options = views.decode_service_patch(self._body())
        note(body=options)
        self._mutate("service.update", {"service": vs, "options": options})
        log.info("updating virtual service [%s] with %s", vs, sorted(options))
        return _done()

    def delete_service(self, vs: str) -> Any:
        vs = validate_object_id(vs)
        self._mutate("service.delete", {"service": vs})
        log.info("removing virtual service [%s]", vs)
        return _done()

    # backends ----------------------------------------------------------------------------------

    def create_backend(self, vs: str, rs: str) -> Any:
        vs, rs = validate_object_id(vs), validate_object_id(rs)
        opts = views.decode_backend(self._body())
        validate_backend(opts, fwmark_service=True)  # the writer checks the port under its service
        note(body=_wire(opts))
        address = ""
        if opts.host and not is_ip(opts.host):
            address = self.resolve(opts.host)
        self._mutate("backend.create", {"service": vs, "backend": rs, "options": _wire(opts),
                                        "address": address})
        log.info("creating backend [%s] on %s:%d for virtual service [%s]", rs,
                 address or opts.host, opts.port, vs)
        return _done()

    def get_backend(self, vs: str, rs: str) -> Any:
        vs, rs = validate_object_id(vs), validate_object_id(rs)
        view = self._ask("backend.get", {"service": vs, "backend": rs})
        return _json(200, views.backend_info(view, time.time()))

    def update_backend(self, vs: str, rs: str) -> Any:
        vs, rs = validate_object_id(vs), validate_object_id(rs)
        weight = views.decode_weight(self._body())
        note(body={"weight": weight})
        self._mutate("backend.update", {"service": vs, "backend": rs, "weight": weight})
        log.info("updating backend [%s/%s] with weight: %d", vs, rs, weight)
        return _done()

    def delete_backend(self, vs: str, rs: str) -> Any:
        vs, rs = validate_object_id(vs), validate_object_id(rs)
        self._mutate("backend.delete", {"service": vs, "backend": rs})
        log.info("removing backend [%s/%s]", vs, rs)
        return _done()

    # the configuration store (discovery) -------------------------------------------------------

    def store_sync(self) -> Any:
        """qk4l's "sync now": one store round in discovery, what it applied."""
        force = _query_flag("force")
        note(body={"force": force})
        try:
            return _json(200, self._ask_discovery("store.sync", {"force": force}))
        finally:
            self.scrapes.invalidate()

    def store_status(self) -> Any:
        """qk4l's dry run: what ``/store/sync`` would change, changing nothing."""
        return _json(200, self._ask_discovery("store.status", {}))

    def _ask_discovery(self, type_: str, body: dict[str, Any]) -> Any:
        if self.discovery is None:
            raise GorbError(errors.NOT_FOUND)  # qk4l without a store
        return self._ask(type_, body, self.discovery)

    # the rest ----------------------------------------------------------------------------------

    def health(self) -> Any:
        auth = "on" if self.auth else "off"
        try:
            self._ask("service.list", {})
        except WriterUnavailable as exc:
            return _json(503, {"api": "ok", "writer": "unavailable", "error": str(exc),
                               "auth": auth})
        return _json(200, {"api": "ok", "writer": "ok", "auth": auth})

    def metrics(self) -> Any:
        gzip = "gzip" in bottle.request.headers.get("Accept-Encoding", "")
        body = self.scrapes.get(gzip)
        headers = {"Content-Type": CONTENT_TYPE_LATEST, "Vary": "Accept-Encoding"}
        if gzip and body.gzip is not None:
            headers["Content-Encoding"] = "gzip"
            parts = body.gzip
        else:
            parts = body.parts
        headers["Content-Length"] = str(sum(map(len, parts)))
        return bottle.HTTPResponse(iter(parts), 200, headers)

    def _render_metrics(self) -> Iterator[str | bytes]:
        yield from self.writer_metrics.chunks(time.time())
        yield generate_latest(self.registry)

    def openapi(self) -> Any:
        return bottle.HTTPResponse(self._openapi, 200, {"Content-Type": JSON})


def _wire(opts: Any) -> dict[str, Any]:
    return msgspec.to_builtins(opts)


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


def _query_flag(name: str) -> bool:
    """A boolean query parameter (``?force=true``): true/1/yes/on, or false/0/no/off, empty or
    absent; any other value is a 400."""
    value = bottle.request.query.get(name)
    if value is None or value.lower() in _FALSE:
        return False
    if value.lower() in _TRUE:
        return True
    raise GorbError(errors.INVALID, f"{name} must be true or false, not {value!r}")


class AccessLog:
    """WSGI middleware: one log line per request (method, path, status, ms), the API's own
    request metrics (``RequestMetrics``), and GORB's empty 200s without a Content-Type; an
    exception that escapes the app is a 500 JSON, logged."""

    def __init__(self, app: Callable, metrics: RequestMetrics | None = None):
        self.app = app
        self.metrics = metrics

    def __call__(self, environ: dict, start_response: Callable) -> Any:
        t0 = time.perf_counter()
        seen: dict[str, Any] = {}

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if any(k.lower() == "content-length" and v == "0" for k, v in headers):
                headers = [(k, v) for k, v in headers if k.lower() != "content-type"]
            seen["status"] = status
            return start_response(status, headers, exc_info) if exc_info else \
                start_response(status, headers)

        try:
            return self.app(environ, start)
        except Exception:
            log.exception("internal error outside the routes")
            body = views.encode({"error": MSG_INTERNAL})
            seen["status"] = "500 Internal Server Error"
            start_response(seen["status"], [("Content-Type", JSON),
                                            ("Content-Length", str(len(body)))])
            return [body]
        finally:
            took = time.perf_counter() - t0
            code = seen.get("status", "-").split(" ")[0]
            access_log.info("%s %s %s %.1fms", environ.get("REQUEST_METHOD"),
                            environ.get("PATH_INFO"), code, took * 1e3)
            if self.metrics is not None:
                route = environ.get("bottle.route")
                self.metrics.observe(environ.get("REQUEST_METHOD", ""),
                                     route.rule if route is not None else "", code, took)


def build(client: WriterClient, resolve: Resolver = resolve_host,
          max_body: int = MAX_BODY,
          discovery: DiscoveryClient | None = None, tokens: Tokens | None = None,
          audit_file: AuditFile | None = None,
          clock: Callable[[], float] = time.time,
          metrics_ttl: float = 1.0) -> tuple[Api, Callable]:
    """The API object and the WSGI application to serve; ``discovery`` only with a store;
    ``tokens`` (not empty) turns authentication on, ``audit_file`` the audit log;
    ``metrics_ttl`` is how long a /metrics body is served again (``Api``).

    The layers, outermost first: AccessLog (log line, metrics, the last 500), Audit (it sees
    every answer, 401s included), Authenticate (before the router: no route is revealed), the
    bottle app."""
    api = Api(client, resolve, max_body, discovery, auth=bool(tokens), metrics_ttl=metrics_ttl)
    wsgi: Callable = api.app
    if tokens:
        wsgi = Authenticate(wsgi, tokens, api.app.router)
    if audit_file is not None:
        wsgi = Audit(wsgi, audit_file, api.app.router, clock)
    return api, AccessLog(wsgi, RequestMetrics(api.registry))
