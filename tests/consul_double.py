"""A stateful Consul agent+server double: one node, one datacenter, a real HTTP server.

It owns a small Consul state (agent services and checks, which double as the catalog; a KV store
with tombstones; one raft index) and serves the subset of the HTTP API gorb uses, with Consul's
wire shapes, so tests drive it through the real ``consul`` client (py-consul) over a socket.
No Consul binary can be had on these machines (reference/ecosystem.md §2.1); this is the stand-in.

    with ConsulDouble() as consul_double:          # 127.0.0.1, a free port
        c = consul.Consul(host=consul_double.host, port=consul_double.port)
        consul_double.stop(); consul_double.start()  # an outage: connection refused, state kept
        consul_double.forget_agent()                 # the agent restarted and lost its registrations
        consul_double.index_backwards(to=3)          # snapshot restore: X-Consul-Index goes down

    python -m tests.consul_double --host 10.0.0.1 --port 8500   # prints its URL; runs until SIGTERM

Endpoints (docs: https://developer.hashicorp.com/consul/api-docs/<section>):

    agent    GET  /v1/agent/self | /v1/agent/services | /v1/agent/checks
             GET  /v1/agent/service/<id>                  hash-blocking (?hash=&wait=)
             PUT  /v1/agent/service/register[?replace-existing-checks]   200, empty body
             PUT  /v1/agent/service/deregister/<id>       404 for an unknown ID
             PUT  /v1/agent/service/maintenance/<id>?enable=&reason=
             PUT  /v1/agent/check/register | /v1/agent/check/deregister/<id>
             PUT  /v1/agent/check/pass|warn|fail/<id>[?note=]   TTL checks
             PUT  /v1/agent/check/update/<id>             {"Status": ..., "Output": ...}
    catalog  GET  /v1/catalog/services | /v1/catalog/service/<name>[?tag=]        blocking
    health   GET  /v1/health/service/<name>[?passing&tag=] | /v1/health/checks/<name>  blocking
    kv       GET  /v1/kv/<key>[?recurse | ?keys[&separator=] | ?raw]             blocking
             PUT  /v1/kv/<key>[?cas=&flags=]  body = raw value    -> true / false
             DELETE /v1/kv/<key>[?recurse][&cas=]                  -> true / false
    status   GET  /v1/status/leader | /v1/status/peers

Invariants, as in Consul:

* One raft index, always >= 1; every write that changes something takes the next one. Reads of
  catalog, health and KV answer ``X-Consul-Index``, ``X-Consul-KnownLeader: true`` and
  ``X-Consul-LastContact: 0``; agent endpoints answer no index (they are local to the agent).
* Each view has its own index: a KV key its ModifyIndex (a missing key: the KV table's index); a
  prefix the highest ModifyIndex under it, deletes included (tombstones are kept); a catalog or
  health service the last change to that service's instances or checks; catalog/services the last
  service (de)registration. ``?index=N`` blocks until the view's index exceeds N or ``wait`` (a Go
  duration, default 5m, at most 10m, plus up to wait/16 jitter) runs out; ``index=0`` answers at
  once. After ``index_backwards`` a client holding a higher index blocks for its whole wait and then
  sees the lower index, which is its cue to reset.
* Writes that change nothing take no index: re-registering an identical service, a TTL update
  with the same status and output, deleting a missing key. Re-registering keeps the status and
  output of checks that already existed (the agent restores them).
* Register bodies are matched as Go's encoding/json does: keys case-insensitively, plus Consul's
  snake_case aliases; wrong JSON types, a missing Name, a bad check or bad service Meta -> 400.
  Check IDs default to ``service:<id>`` (``service:<id>:<n>`` with several checks); a new check is
  critical unless it gives ``Status``. The double runs no HTTP/TCP checks: ``set_check`` sets them.
  TTL checks turn critical when not refreshed within their TTL, evaluated on every request against
  the injected ``clock``; a blocked health/catalog query also wakes at the next expiry.
* health/service entries carry the node's ``serfHealth`` check (always passing) and node-level
  checks; ``?passing`` keeps an entry only if all its checks pass. The catalog also lists the
  server's own ``consul`` service, as a real server agent does; the agent endpoints do not.
* ``stop()`` closes the listening socket and every open connection (blocked queries included), so
  clients see connection refused or a reset; ``start()`` binds the same port again with the state kept.

Assumed from Consul's source and docs but not run against a real agent here: jitter; the exact
error texts; an unknown TTL check answering 404; empty Tags/Meta answered as ``[]``/``{}``;
the order of checks inside a health entry.
"""

from __future__ import annotations

import argparse
import base64
import copy
import dataclasses
import hashlib
import json
import random
import re
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

DATACENTER = "dc1"
NODE_NAME = "consul-double"
NODE_ID = "8f2a4c1e-0d7b-4e55-9a63-6b1d2c3e4f50"
PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
STATUSES = (PASSING, WARNING, CRITICAL)

DEFAULT_WAIT = 300.0  # Consul's default blocking wait (5m) ...
MAX_WAIT = 600.0  # ... and its default cap (10m)
KV_MAX_VALUE = 512 * 1024  # kv_max_value_size
OUTPUT_MAX = 4096  # check_output_max_size
META_KEY = re.compile(r"^[a-zA-Z0-9_-]+$")

# Consul's decodeBody translations (snake_case -> field) for register bodies; any other key is
# matched case-insensitively, as Go's encoding/json does.
_ALIASES = {
    "enable_tag_override": "enabletagoverride",
    "tagged_addresses": "taggedaddresses",
    "deregister_critical_service_after": "deregistercriticalserviceafter",
    "docker_container_id": "dockercontainerid",
    "tls_server_name": "tlsservername",
    "tls_skip_verify": "tlsskipverify",
    "grpc_use_tls": "grpcusetls",
    "service_id": "serviceid",
    "script_args": "scriptargs",
    "args": "scriptargs",
    "check_id": "checkid",
}


class Request(NamedTuple):
    """One logged request: the decoded path and the first value of each query parameter."""

    method: str
    path: str
    query: dict[str, str]


@dataclasses.dataclass
class _Fault:
    prefix: str
    status: int | None
    body: str
    delay: float
    count: int | None


@dataclasses.dataclass
class _KV:
    key: str
    value: bytes | None
    flags: int
    create_index: int
    modify_index: int


@dataclasses.dataclass
class _Service:
    id: str
    name: str
    tags: list[str]
    meta: dict[str, str]
    address: str
    port: int
    weights: dict[str, int]
    enable_tag_override: bool
    tagged_addresses: dict[str, Any]
    create_index: int = 0
    modify_index: int = 0

    def definition(self) -> tuple:
        return (self.name, self.tags, self.meta, self.address, self.port, self.weights,
                self.enable_tag_override, self.tagged_addresses)


@dataclasses.dataclass
class _Check:
    check_id: str
    name: str
    service_id: str  # "" for a node-level check
    type: str  # ttl, http, tcp, script, grpc, docker, udp, h2ping, alias, maintenance
    status: str
    output: str = ""
    notes: str = ""
    ttl: float | None = None
    interval: str = ""
    timeout: str = ""
    definition: dict[str, Any] = dataclasses.field(default_factory=dict)
    deadline: float | None = None  # clock() after which a TTL check expires
    create_index: int = 0
    modify_index: int = 0

    def shape(self) -> tuple:
        return (self.name, self.service_id, self.type, self.status, self.output, self.notes,
                self.ttl, self.interval, self.timeout, self.definition)


class _Reply(NamedTuple):
    status: int
    body: bytes
    content_type: str | None = "application/json"
    index: int | None = None  # set on indexed (catalog/health/kv) reads
    extra: dict[str, str] | None = None


class _HTTPError(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status = status
        self.text = text


class _Abort(Exception):
    """The double stopped while this request was in flight: drop the connection unanswered."""


def _json(obj: Any, status: int = 200, index: int | None = None) -> _Reply:
    return _Reply(status, json.dumps(obj).encode(), "application/json", index)


def _empty(status: int = 200, index: int | None = None) -> _Reply:
    return _Reply(status, b"", None, index)


def parse_go_duration(text: str) -> float:
    """Go's ``time.ParseDuration`` in seconds: "10s", "1m30s", "1.5h", "100ms", "0"."""
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    sign = -1.0 if text.startswith("-") else 1.0
    s = text[1:] if text[:1] in ("+", "-") else text
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"time: invalid duration {text!r}")
    total, pos = 0.0, 0
    part = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
    while pos < len(s):
        m = part.match(s, pos)
        if not m:
            raise ValueError(f"time: invalid duration {text!r}")
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    return sign * total


def _fold(obj: Any, where: str) -> dict[str, Any]:
    """A JSON object's keys as Go would match them to struct fields (see _ALIASES)."""
    if not isinstance(obj, dict):
        raise _HTTPError(400, f"Request decode failed: json: cannot unmarshal {_go_type(obj)} "
                              f"into Go value of type {where}")
    return {_ALIASES.get(k, k.lower()): v for k, v in obj.items()}


def _go_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _get(d: dict[str, Any], field: str, kind: str, default: Any, where: str) -> Any:
    """Field *field* (lower case) of a folded object, type-checked the way encoding/json is."""
    value = d.get(field.lower())
    if value is None:
        return default
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "strlist": isinstance(value, list) and all(isinstance(v, str) for v in value),
        "strmap": isinstance(value, dict) and all(isinstance(v, str) for v in value.values()),
        "map": isinstance(value, dict),
        "any": True,
    }[kind]
    if not ok:
        raise _HTTPError(400, f"Request decode failed: json: cannot unmarshal {_go_type(value)} "
                              f"into Go struct field {where}.{field} of type {kind}")
    return copy.deepcopy(value)


def _duration_field(d: dict[str, Any], field: str, where: str) -> tuple[str, float | None]:
    """A Go duration given as a string ("10s") or as nanoseconds: (as given, seconds)."""
    value = d.get(field.lower())
    if value is None or value == "":
        return "", None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value), value / 1e9
    if isinstance(value, str):
        try:
            return value, parse_go_duration(value)
        except ValueError as e:
            raise _HTTPError(400, f"Request decode failed: {e}") from None
    raise _HTTPError(400, f"Request decode failed: json: cannot unmarshal {_go_type(value)} "
                          f"into Go struct field {where}.{field} of type time.Duration")


def _parse_bool(text: str) -> bool:
    """Go's strconv.ParseBool."""
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ValueError(text)


def _parse_uint(text: str, what: str) -> int:
    if not text.isdigit() or int(text) >= 2**64:
        raise _HTTPError(400, f"Invalid {what}")
    return int(text)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], double: ConsulDouble):
        self.double = double
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        # Go's net package sets TCP_NODELAY on every connection; without it the header and body
        # writes meet the client's delayed ACK and each reply takes ~40 ms more.
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        with self.connections_lock:
            conns = list(self.connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like Go's net/http
    server: _Server

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except (_Abort, ConnectionError, OSError):
            self.close_connection = True

    def do_GET(self):
        self.server.double._serve(self)

    do_PUT = do_DELETE = do_POST = do_GET

    def log_message(self, format, *args):  # noqa: A002 - quiet: tests read .requests instead
        pass

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""


class ConsulDouble:
    """A Consul agent on one node that is also its cluster's only server. See the module docstring.

    ``clock`` (seconds, monotonic) drives TTL expiry only; blocking waits use real time.
    ``jitter=False`` drops the up-to-wait/16 random extra on blocking waits.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 clock: Callable[[], float] = time.monotonic, jitter: bool = True):
        self.host = host
        self.port = port
        self._clock = clock
        self._jitter = jitter
        self._random = random.Random()
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._generation = 0  # bumped by stop(): requests of an older generation are dropped
        self._running = False
        self._requests: list[Request] = []
        self._faults: list[_Fault] = []
        # state
        self._index = 1
        self._kv: dict[str, _KV] = {}
        self._tombstones: dict[str, int] = {}  # deleted key -> index of its deletion
        self._kv_index = 0  # the KV table's index (entries and tombstones)
        self._services: dict[str, _Service] = {}
        self._checks: dict[str, _Check] = {}
        self._service_index: dict[str, int] = {}  # service name -> last change to it
        self._services_index = 0  # last service (de)registration: catalog/services
        self._extinction_index = 0  # last time a service name lost its last instance
        self._consul_index = self._bump()  # the server's own "consul" service

    # ---- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> ConsulDouble:
        """Listen on host:port (the port picked at the first start is kept for later starts)."""
        with self._lock:
            if self._running:
                return self
        server = _Server((self.host, self.port), self)
        self.port = server.server_address[1]
        with self._lock:
            self._server = server
            self._running = True
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"consul-double:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Go away like a crashed agent: refuse new connections, reset open ones, keep the state."""
        with self._cond:
            if not self._running:
                return
            self._running = False
            self._generation += 1
            server, self._server = self._server, None
            self._cond.notify_all()  # blocked queries see the new generation and abort
        assert server is not None and self._thread is not None
        server.shutdown()
        server.socket.close()
        server.drop_connections()
        server.server_close()  # joins the handler threads
        self._thread.join()
        self._thread = None

    def __enter__(self) -> ConsulDouble:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- knobs for tests -----------------------------------------------------------------------

    def forget_agent(self) -> None:
        """The agent restarted without its registrations: its services and checks are gone, and
        anti-entropy has removed them from the catalog too."""
        with self._cond:
            if not self._services and not self._checks:
                return
            idx = self._bump()
            names = {s.name for s in self._services.values()} | self._node_check_names()
            had_services = bool(self._services)
            self._services.clear()
            self._checks.clear()
            if had_services:
                self._services_index = idx
            for name in names:
                self._touch_service(name, idx)
            self._cond.notify_all()

    def index_backwards(self, to: int) -> None:
        """The raft index jumps back to *to* (a snapshot restore or a new leader). The data stays;
        every index above *to* becomes *to*, and the next write takes to + 1."""
        with self._cond:
            if not 1 <= to < self._index:
                raise ValueError(f"index_backwards: need 1 <= to < {self._index}, got {to}")
            self._index = to

            def clamp(i: int) -> int:
                return min(i, to)

            for e in self._kv.values():
                e.create_index, e.modify_index = clamp(e.create_index), clamp(e.modify_index)
            self._tombstones = {k: clamp(i) for k, i in self._tombstones.items()}
            for s in self._services.values():
                s.create_index, s.modify_index = clamp(s.create_index), clamp(s.modify_index)
            for c in self._checks.values():
                c.create_index, c.modify_index = clamp(c.create_index), clamp(c.modify_index)
            self._service_index = {n: clamp(i) for n, i in self._service_index.items()}
            self._kv_index = clamp(self._kv_index)
            self._services_index = clamp(self._services_index)
            self._extinction_index = clamp(self._extinction_index)
            self._consul_index = clamp(self._consul_index)
            self._cond.notify_all()

    def set_check(self, check_id: str, status: str, output: str = "") -> None:
        """What the agent's own HTTP/TCP/script runner would report (the double runs no checks)."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}")
        with self._cond:
            check = self._checks[check_id]
            self._update_check(check, status, output)
            self._cond.notify_all()

    def check_ttls(self) -> None:
        """Expire TTL checks now (after moving an injected clock) and wake blocked queries."""
        with self._cond:
            self._expire_ttls()
            self._cond.notify_all()

    def fault(self, prefix: str, status: int | None = 500, body: str = "rpc error: consul-double fault",
              delay: float = 0.0, count: int | None = None) -> None:
        """Requests whose path starts with *prefix* wait *delay* s, then get *status* with *body*
        (status None: served normally after the delay). *count* None means until clear_faults()."""
        with self._lock:
            self._faults.append(_Fault(prefix, status, body, delay, count))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    # ---- state for assertions (copies) ---------------------------------------------------------

    @property
    def index(self) -> int:
        with self._lock:
            return self._index

    @property
    def services(self) -> dict[str, dict]:
        """Agent services as GET /v1/agent/services shows them."""
        with self._lock:
            return {sid: self._agent_service_json(s) for sid, s in self._services.items()}

    @property
    def checks(self) -> dict[str, dict]:
        """Agent checks as GET /v1/agent/checks shows them (TTL expiry applied)."""
        with self._cond:
            self._expire_ttls()
            return {cid: self._check_json(c) for cid, c in self._checks.items()}

    @property
    def kv(self) -> dict[str, bytes | None]:
        with self._lock:
            return {k: e.value for k, e in sorted(self._kv.items())}

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    # ---- HTTP plumbing -------------------------------------------------------------------------

    def _serve(self, h: _Handler) -> None:
        split = urlsplit(h.path)
        path = unquote(split.path)
        multi = parse_qs(split.query, keep_blank_values=True)
        query = {k: v[0] for k, v in multi.items()}
        body = h.read_body()
        with self._cond:
            if not self._running:
                raise _Abort
            gen = self._generation
            self._requests.append(Request(h.command, path, dict(query)))
            fault = self._take_fault(path)
        try:
            if fault is not None and fault.delay:
                self._sleep(fault.delay, gen)
            if fault is not None and fault.status is not None:
                reply = _Reply(fault.status, fault.body.encode(), "text/plain; charset=utf-8")
            else:
                reply = self._route(h.command, path, query, multi, body, gen)
        except _HTTPError as e:
            reply = _Reply(e.status, e.text.encode(), "text/plain; charset=utf-8")
        except _Abort:
            raise
        except Exception:  # a bug in the double: say so loudly, to the client and on stderr
            traceback.print_exc()
            reply = _Reply(500, traceback.format_exc().encode(), "text/plain; charset=utf-8")
        with self._lock:
            if self._generation != gen:
                raise _Abort
        h.send_response(reply.status)
        if reply.content_type:
            h.send_header("Content-Type", reply.content_type)
        h.send_header("Vary", "Accept-Encoding")
        if reply.index is not None:
            h.send_header("X-Consul-Index", str(max(1, reply.index)))
            h.send_header("X-Consul-KnownLeader", "true")
            h.send_header("X-Consul-LastContact", "0")
        for k, v in (reply.extra or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(reply.body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(reply.body)

    def _take_fault(self, path: str) -> _Fault | None:
        for f in self._faults:
            if path.startswith(f.prefix):
                if f.count is not None:
                    f.count -= 1
                    if f.count <= 0:
                        self._faults.remove(f)
                return f
        return None

    def _sleep(self, seconds: float, gen: int) -> None:
        deadline = time.monotonic() + seconds
        with self._cond:
            while (left := deadline - time.monotonic()) > 0:
                self._check_alive(gen)
                self._cond.wait(left)
            self._check_alive(gen)

    def _check_alive(self, gen: int) -> None:
        if not self._running or self._generation != gen:
            raise _Abort

    _ROUTES: list[tuple[re.Pattern, tuple[str, ...], str]] = [
        (re.compile(p), tuple(m.split()), fn) for p, m, fn in [
            (r"/v1/agent/self", "GET", "_agent_self"),
            (r"/v1/agent/services", "GET", "_agent_services"),
            (r"/v1/agent/checks", "GET", "_agent_checks"),
            (r"/v1/agent/service/register", "PUT", "_agent_service_register"),
            (r"/v1/agent/service/deregister/(.+)", "PUT", "_agent_service_deregister"),
            (r"/v1/agent/service/maintenance/(.+)", "PUT", "_agent_service_maintenance"),
            (r"/v1/agent/check/register", "PUT", "_agent_check_register"),
            (r"/v1/agent/check/deregister/(.+)", "PUT", "_agent_check_deregister"),
            (r"/v1/agent/check/(pass|warn|fail)/(.+)", "PUT", "_agent_check_ttl"),
            (r"/v1/agent/check/update/(.+)", "PUT", "_agent_check_update"),
            (r"/v1/agent/service/(.+)", "GET", "_agent_service"),
            (r"/v1/catalog/services", "GET", "_catalog_services"),
            (r"/v1/catalog/service/(.+)", "GET", "_catalog_service"),
            (r"/v1/health/service/(.+)", "GET", "_health_service"),
            (r"/v1/health/checks/(.+)", "GET", "_health_checks"),
            (r"/v1/kv/(.*)", "GET PUT DELETE", "_kv_endpoint"),
            (r"/v1/status/leader", "GET", "_status_leader"),
            (r"/v1/status/peers", "GET", "_status_peers"),
        ]
    ]

    def _route(self, method: str, path: str, query: dict[str, str], multi: dict[str, list[str]],
               body: bytes, gen: int) -> _Reply:
        for pattern, methods, fn in self._ROUTES:
            m = pattern.fullmatch(path)
            if not m:
                continue
            if method not in methods:
                raise _HTTPError(405, f"method {method} not allowed")
            dc = query.get("dc")
            if dc and dc != DATACENTER:
                raise _HTTPError(500, f'No path to datacenter "{dc}"')
            for unsupported in ("filter", "near", "node-meta", "peer", "ns", "partition"):
                if query.get(unsupported):
                    raise _HTTPError(400, f"consul-double does not implement ?{unsupported}")
            req = _Req(method, query, multi, body, gen)
            return getattr(self, fn)(req, *m.groups())
        raise _HTTPError(404, "404 page not found\n")

    # ---- blocking queries ----------------------------------------------------------------------
    # https://developer.hashicorp.com/consul/api-docs/features/blocking

    def _wait_seconds(self, query: dict[str, str]) -> float:
        wait = DEFAULT_WAIT
        if query.get("wait"):
            try:
                wait = parse_go_duration(query["wait"])
            except ValueError:
                raise _HTTPError(400, "Invalid wait time") from None
        if wait <= 0:
            wait = DEFAULT_WAIT
        wait = min(wait, MAX_WAIT)
        if self._jitter:
            wait += self._random.uniform(0, wait / 16)
        return wait

    def _blocking(self, req: _Req, view: Callable[[], _Reply]) -> _Reply:
        """Answer *view* once its index exceeds ?index, or when the wait runs out."""
        min_index = _parse_uint(req.query["index"], "index") if req.query.get("index") else 0
        deadline = time.monotonic() + (self._wait_seconds(req.query) if min_index else 0.0)
        return self._block_until(req.gen, deadline, view, lambda r: min_index == 0 or r.index > min_index)

    def _block_until(self, gen: int, deadline: float, view: Callable[[], _Reply],
                     done: Callable[[_Reply], bool]) -> _Reply:
        with self._cond:
            while True:
                self._check_alive(gen)
                self._expire_ttls()
                reply = view()
                left = deadline - time.monotonic()
                if done(reply) or left <= 0:
                    return reply
                self._cond.wait(min(left, self._next_expiry_in()))

    # ---- state changes (all under the lock) ----------------------------------------------------

    def _bump(self) -> int:
        self._index += 1
        return self._index

    def _touch_service(self, name: str, idx: int) -> None:
        """Record a change to service *name*'s instances or checks at *idx*."""
        if any(s.name == name for s in self._services.values()):
            self._service_index[name] = idx
        else:
            self._service_index.pop(name, None)
            self._extinction_index = idx

    def _node_check_names(self) -> set[str]:
        """Every service name, if the agent has node-level checks (they show in every entry)."""
        if any(not c.service_id for c in self._checks.values()):
            return {s.name for s in self._services.values()}
        return set()

    def _update_check(self, check: _Check, status: str, output: str) -> None:
        output = output[:OUTPUT_MAX]
        if check.ttl is not None:
            check.deadline = self._clock() + check.ttl
        if (check.status, check.output) == (status, output):
            return  # the agent syncs nothing when nothing changed
        check.status, check.output = status, output
        idx = check.modify_index = self._bump()
        self._touch_check_owner(check, idx)

    def _touch_check_owner(self, check: _Check, idx: int) -> None:
        if check.service_id and check.service_id in self._services:
            self._touch_service(self._services[check.service_id].name, idx)
        elif not check.service_id:
            for name in {s.name for s in self._services.values()}:
                self._touch_service(name, idx)

    def _expire_ttls(self) -> None:
        now = self._clock()
        changed = False
        for c in self._checks.values():
            if c.deadline is not None and now >= c.deadline:
                c.deadline = None  # expired once; a new update restarts the timer
                output = f"TTL expired (last output before timeout follows): {c.output}"[:OUTPUT_MAX]
                if (c.status, c.output) != (CRITICAL, output):
                    c.status, c.output = CRITICAL, output
                    c.modify_index = self._bump()
                    self._touch_check_owner(c, c.modify_index)
                    changed = True
        if changed:
            self._cond.notify_all()

    def _next_expiry_in(self) -> float:
        deadlines = [c.deadline for c in self._checks.values() if c.deadline is not None]
        if not deadlines:
            return MAX_WAIT * 2
        return max(0.005, min(deadlines) - self._clock())

    # ---- JSON shapes ---------------------------------------------------------------------------

    def _node_address(self) -> str:
        return "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host

    def _node_json(self) -> dict:
        addr = self._node_address()
        return {"ID": NODE_ID, "Node": NODE_NAME, "Address": addr, "Datacenter": DATACENTER,
                "TaggedAddresses": {"lan": addr, "lan_ipv4": addr, "wan": addr, "wan_ipv4": addr},
                "Meta": {"consul-network-segment": ""}, "CreateIndex": 1, "ModifyIndex": 1}

    def _consul_service(self) -> _Service:
        return _Service("consul", "consul", [], {}, "", 8300, {"Passing": 1, "Warning": 1}, False, {},
                        self._consul_index, self._consul_index)

    def _agent_service_json(self, s: _Service) -> dict:
        return {"ID": s.id, "Service": s.name, "Tags": list(s.tags), "Meta": dict(s.meta),
                "Port": s.port, "Address": s.address, "TaggedAddresses": copy.deepcopy(s.tagged_addresses),
                "Weights": dict(s.weights), "EnableTagOverride": s.enable_tag_override,
                "Datacenter": DATACENTER}

    def _catalog_service_json(self, s: _Service) -> dict:
        node = self._node_json()
        return {"ID": NODE_ID, "Node": NODE_NAME, "Address": node["Address"], "Datacenter": DATACENTER,
                "TaggedAddresses": node["TaggedAddresses"], "NodeMeta": node["Meta"],
                "ServiceKind": "", "ServiceID": s.id, "ServiceName": s.name, "ServiceTags": list(s.tags),
                "ServiceAddress": s.address, "ServiceTaggedAddresses": copy.deepcopy(s.tagged_addresses),
                "ServiceWeights": dict(s.weights), "ServiceMeta": dict(s.meta), "ServicePort": s.port,
                "ServiceEnableTagOverride": s.enable_tag_override,
                "CreateIndex": s.create_index, "ModifyIndex": s.modify_index}

    def _health_service_json(self, s: _Service) -> dict:
        svc = self._agent_service_json(s)
        del svc["Datacenter"]
        svc.update(CreateIndex=s.create_index, ModifyIndex=s.modify_index)
        return svc

    def _check_json(self, c: _Check) -> dict:
        svc = self._services.get(c.service_id)
        return {"Node": NODE_NAME, "CheckID": c.check_id, "Name": c.name, "Status": c.status,
                "Notes": c.notes, "Output": c.output, "ServiceID": c.service_id,
                "ServiceName": svc.name if svc else "", "ServiceTags": list(svc.tags) if svc else [],
                "Type": c.type, "Interval": c.interval, "Timeout": c.timeout, "ExposedPort": 0,
                "Definition": copy.deepcopy(c.definition),
                "CreateIndex": c.create_index, "ModifyIndex": c.modify_index}

    def _serf_health(self) -> dict:
        return {"Node": NODE_NAME, "CheckID": "serfHealth", "Name": "Serf Health Status",
                "Status": PASSING, "Notes": "", "Output": "Agent alive and reachable", "ServiceID": "",
                "ServiceName": "", "ServiceTags": [], "Type": "", "Interval": "", "Timeout": "",
                "ExposedPort": 0, "Definition": {}, "CreateIndex": 1, "ModifyIndex": 1}

    # ---- agent ---------------------------------------------------------------------------------
    # https://developer.hashicorp.com/consul/api-docs/agent, .../agent/service, .../agent/check

    def _agent_self(self, req: _Req) -> _Reply:
        with self._lock:
            addr = self._node_address()
            return _json({
                "Config": {"Datacenter": DATACENTER, "NodeName": NODE_NAME, "NodeID": NODE_ID,
                           "Server": True, "Version": "1.22.0-consul-double"},
                "Member": {"Name": NODE_NAME, "Addr": addr, "Port": 8301, "Status": 1,
                           "Tags": {"dc": DATACENTER, "role": "consul"}},
            })

    def _agent_services(self, req: _Req) -> _Reply:
        return _json(self.services)

    def _agent_checks(self, req: _Req) -> _Reply:
        return _json(self.checks)

    def _agent_service(self, req: _Req, sid: str) -> _Reply:
        """Hash-based blocking: ?hash=<X-Consul-ContentHash>&wait= blocks while the hash is equal."""
        def view() -> _Reply:
            s = self._services.get(sid)
            if s is None:
                return _Reply(404, f"unknown service ID: {sid}".encode(), "text/plain; charset=utf-8")
            body = self._agent_service_json(s)
            digest = hashlib.blake2b(json.dumps(body, sort_keys=True).encode(), digest_size=8).hexdigest()
            body["ContentHash"] = digest
            return _Reply(200, json.dumps(body).encode(), extra={"X-Consul-ContentHash": digest})

        wanted = req.query.get("hash", "")
        deadline = time.monotonic() + (self._wait_seconds(req.query) if wanted else 0.0)
        return self._block_until(req.gen, deadline, view,
                                 lambda r: not wanted or (r.extra or {}).get("X-Consul-ContentHash") != wanted)

    def _agent_service_register(self, req: _Req) -> _Reply:
        body = req.json()
        d = _fold(body, "structs.ServiceDefinition")
        where = "ServiceDefinition"
        name = _get(d, "Name", "str", "", where)
        if not name:
            raise _HTTPError(400, "Missing service name")
        sid = _get(d, "ID", "str", "", where) or name
        meta = _get(d, "Meta", "strmap", {}, where)
        self._validate_meta(meta)
        weights_in = _get(d, "Weights", "map", None, where)
        weights = {"Passing": 1, "Warning": 1}
        if weights_in is not None:
            w = _fold(weights_in, "structs.Weights")
            weights = {"Passing": _get(w, "Passing", "int", 0, "Weights"),
                       "Warning": _get(w, "Warning", "int", 0, "Weights")}
            if weights["Passing"] <= 0:
                raise _HTTPError(400, "Invalid Weights: Passing must be greater than 0")
        service = _Service(
            id=sid, name=name,
            tags=_get(d, "Tags", "strlist", [], where),
            meta=meta,
            address=_get(d, "Address", "str", "", where),
            port=_get(d, "Port", "int", 0, where),
            weights=weights,
            enable_tag_override=_get(d, "EnableTagOverride", "bool", False, where),
            tagged_addresses=_get(d, "TaggedAddresses", "map", {}, where),
        )
        raw_checks = []
        if d.get("check") is not None:
            raw_checks.append(d["check"])
        if d.get("checks") is not None:
            if not isinstance(d["checks"], list):
                raise _HTTPError(400, "Request decode failed: json: cannot unmarshal "
                                      f"{_go_type(d['checks'])} into Go struct field {where}.Checks")
            raw_checks.extend(d["checks"])
        checks = []
        for i, raw in enumerate(raw_checks):
            default_id = f"service:{sid}" + (f":{i + 1}" if len(raw_checks) > 1 else "")
            checks.append(self._parse_check(raw, default_id, f"Service '{name}' check", sid))
        replace = "replace-existing-checks" in req.query
        with self._cond:
            self._register(service, checks, replace)
            self._cond.notify_all()
        return _empty()

    @staticmethod
    def _validate_meta(meta: dict[str, str]) -> None:
        def fail(reason: str) -> None:
            raise _HTTPError(400, f"Invalid Service Meta: {reason}")

        if len(meta) > 64:
            fail("Node metadata cannot contain more than 64 key/value pairs")
        for key, value in meta.items():
            pair = f"Couldn't load metadata pair ('{key}', '{value}'): "
            if key == "":
                fail(pair + "Key cannot be blank")
            if not META_KEY.match(key):
                fail(pair + "Key contains invalid characters")
            if len(key) > 128:
                fail(pair + "Key is too long (limit: 128 characters)")
            if key.startswith("consul-"):
                fail(pair + "Key prefix 'consul-' is reserved for internal use")
            if len(value) > 512:
                fail(pair + "Value is too long (limit: 512 characters)")

    def _parse_check(self, raw: Any, default_id: str, default_name: str, service_id: str) -> _Check:
        where = "CheckType"
        c = _fold(raw, "structs.CheckType")
        ttl_text, ttl = _duration_field(c, "TTL", where)
        interval_text, interval = _duration_field(c, "Interval", where)
        timeout_text, _ = _duration_field(c, "Timeout", where)
        kinds = [(k, c.get(k.lower())) for k in
                 ("HTTP", "TCP", "ScriptArgs", "GRPC", "DockerContainerID", "UDP", "H2PING", "OSService")]
        given = [k for k, v in kinds if v]
        alias = bool(c.get("aliasservice") or c.get("aliasnode"))
        if interval and ttl:
            raise _HTTPError(400, "Invalid check: Interval and TTL cannot both be specified")
        interval_check = bool(given)
        if interval_check and not interval:
            raise _HTTPError(400, "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, "
                                  "UDP or OSService checks")
        if not interval_check and not alias and not (ttl and ttl > 0):
            raise _HTTPError(400, "Invalid check: TTL must be > 0 for TTL checks")
        status = _get(c, "Status", "str", "", where)
        if status and status not in STATUSES:
            raise _HTTPError(400, "Status for checks must 'passing', 'warning', 'critical'")
        kind = {"HTTP": "http", "TCP": "tcp", "ScriptArgs": "script", "GRPC": "grpc",
                "DockerContainerID": "docker", "UDP": "udp", "H2PING": "h2ping",
                "OSService": "os_service"}.get(given[0], "") if given else ("alias" if alias else "ttl")
        definition = {k: v for k, v in raw.items() if k.lower() not in ("status", "notes")} \
            if isinstance(raw, dict) else {}
        check_id = _get(c, "CheckID", "str", "", where) or _get(c, "ID", "str", "", where) or default_id
        return _Check(
            check_id=check_id,
            name=_get(c, "Name", "str", "", where) or default_name,
            service_id=service_id,
            type=kind,
            status=status or CRITICAL,
            notes=_get(c, "Notes", "str", "", where),
            ttl=ttl if kind == "ttl" else None,
            interval=interval_text,
            timeout=timeout_text,
            definition=definition,
        )

    def _register(self, service: _Service, checks: list[_Check], replace: bool) -> None:
        """Add or replace *service* and its *checks*; take an index only if something changed."""
        old = self._services.get(service.id)
        service_changed = old is None or old.definition() != service.definition()
        new_ids = {c.check_id for c in checks}
        dropped = [cid for cid, c in self._checks.items()
                   if replace and c.service_id == service.id and cid not in new_ids]
        changed_checks = []
        now = self._clock()
        for c in checks:
            prev = self._checks.get(c.check_id)
            if prev is not None:  # the agent restores a re-registered check's status and output
                c.status, c.output = prev.status, prev.output
                c.create_index, c.modify_index = prev.create_index, prev.modify_index
            if c.ttl is not None:
                c.deadline = now + c.ttl
            if prev is None or prev.shape() != c.shape():
                changed_checks.append(c)
            else:
                prev.deadline = c.deadline
        if not service_changed and not changed_checks and not dropped:
            return
        idx = self._bump()
        if service_changed:
            service.create_index = old.create_index if old else idx
            service.modify_index = idx
            self._services[service.id] = service
            self._services_index = idx
        for cid in dropped:
            del self._checks[cid]
        for c in changed_checks:
            c.create_index = c.create_index or idx
            c.modify_index = idx
            self._checks[c.check_id] = c
        self._touch_service(service.name, idx)
        if old is not None and old.name != service.name:
            self._touch_service(old.name, idx)

    def _agent_service_deregister(self, req: _Req, sid: str) -> _Reply:
        with self._cond:
            service = self._services.pop(sid, None)
            if service is None:
                raise _HTTPError(404, f'Unknown service ID "{sid}". Ensure that the service ID is '
                                      "passed, not the service name.")
            idx = self._bump()
            for cid in [cid for cid, c in self._checks.items() if c.service_id == sid]:
                del self._checks[cid]
            self._services_index = idx
            self._touch_service(service.name, idx)
            self._cond.notify_all()
        return _empty()

    def _agent_service_maintenance(self, req: _Req, sid: str) -> _Reply:
        if "enable" not in req.query:
            raise _HTTPError(400, "Missing value for enable")
        try:
            enable = _parse_bool(req.query["enable"])
        except ValueError:
            raise _HTTPError(400, "Invalid value for enable") from None
        with self._cond:
            service = self._services.get(sid)
            if service is None:
                raise _HTTPError(404, f'Unknown service ID "{sid}"')
            cid = f"_service_maintenance:{sid}"
            if enable and cid not in self._checks:
                reason = req.query.get("reason") or ("Maintenance mode is enabled for this service, but no "
                                                     "reason was provided. This is a default message.")
                idx = self._bump()
                self._checks[cid] = _Check(cid, "Service Maintenance Mode", sid, "maintenance", CRITICAL,
                                           notes=reason, create_index=idx, modify_index=idx)
                self._touch_service(service.name, idx)
            elif not enable and cid in self._checks:
                del self._checks[cid]
                self._touch_service(service.name, self._bump())
            self._cond.notify_all()
        return _empty()

    def _agent_check_register(self, req: _Req) -> _Reply:
        d = _fold(req.json(), "structs.CheckDefinition")
        name = _get(d, "Name", "str", "", "CheckDefinition")
        if not name:
            raise _HTTPError(400, "Missing check name")
        sid = _get(d, "ServiceID", "str", "", "CheckDefinition")
        check = self._parse_check(req.json(), _get(d, "ID", "str", "", "CheckDefinition") or name, name, sid)
        with self._cond:
            if sid and sid not in self._services:
                raise _HTTPError(400, f'ServiceID "{sid}" does not exist')
            prev = self._checks.get(check.check_id)
            if prev is not None:
                check.status, check.output, check.create_index = prev.status, prev.output, prev.create_index
            if check.ttl is not None:
                check.deadline = self._clock() + check.ttl
            idx = self._bump()
            check.create_index = check.create_index or idx
            check.modify_index = idx
            self._checks[check.check_id] = check
            self._touch_check_owner(check, idx)
            self._cond.notify_all()
        return _empty()

    def _agent_check_deregister(self, req: _Req, cid: str) -> _Reply:
        with self._cond:
            check = self._checks.pop(cid, None)
            if check is None:
                raise _HTTPError(404, f'Unknown check ID "{cid}". Ensure that the check ID is passed, '
                                      "not the check name.")
            self._touch_check_owner(check, self._bump())
            self._cond.notify_all()
        return _empty()

    def _agent_check_ttl(self, req: _Req, verb: str, cid: str) -> _Reply:
        status = {"pass": PASSING, "warn": WARNING, "fail": CRITICAL}[verb]
        return self._ttl_update(cid, status, req.query.get("note", ""))

    def _agent_check_update(self, req: _Req, cid: str) -> _Reply:
        d = _fold(req.json(), "checkUpdate")
        status = _get(d, "Status", "str", "", "checkUpdate")
        if status not in STATUSES:
            raise _HTTPError(400, "Invalid check status: '%s'" % status)
        return self._ttl_update(cid, status, _get(d, "Output", "str", "", "checkUpdate"))

    def _ttl_update(self, cid: str, status: str, output: str) -> _Reply:
        with self._cond:
            check = self._checks.get(cid)
            if check is None:
                raise _HTTPError(404, f'Unknown check ID "{cid}". Ensure that the check ID is passed, '
                                      "not the check name.")
            if check.ttl is None:
                raise _HTTPError(500, f'CheckID "{cid}" does not have associated TTL')
            self._update_check(check, status, output)
            self._cond.notify_all()
        return _empty()

    # ---- catalog and health --------------------------------------------------------------------
    # https://developer.hashicorp.com/consul/api-docs/catalog, .../api-docs/health

    def _instances(self, name: str, tags: list[str]) -> list[_Service]:
        """Instances of *name*, sorted by ID, having every tag in *tags* (case-insensitive)."""
        found = [s for s in self._services.values() if s.name == name]
        if name == "consul":
            found.append(self._consul_service())
        wanted = [t.lower() for t in tags]
        return sorted((s for s in found if all(t in {x.lower() for x in s.tags} for t in wanted)),
                      key=lambda s: s.id)

    def _service_view_index(self, name: str) -> int:
        if name == "consul":
            return max(self._consul_index, self._service_index.get(name, 0))
        if name in self._service_index:
            return self._service_index[name]
        return self._extinction_index or self._services_index or self._index

    def _catalog_services(self, req: _Req) -> _Reply:
        def view() -> _Reply:
            out: dict[str, set[str]] = {"consul": set()}
            for s in self._services.values():
                out.setdefault(s.name, set()).update(s.tags)
            index = max(self._services_index, self._consul_index)
            return _json({n: sorted(t) for n, t in sorted(out.items())}, index=index)

        return self._blocking(req, view)

    def _catalog_service(self, req: _Req, name: str) -> _Reply:
        tags = req.multi.get("tag", [])

        def view() -> _Reply:
            entries = [self._catalog_service_json(s) for s in self._instances(name, tags)]
            return _json(entries, index=self._service_view_index(name))

        return self._blocking(req, view)

    def _service_checks(self, s: _Service) -> list[dict]:
        if s.id == "consul" and s.name == "consul" and s.id not in self._services:
            return []
        return [self._check_json(c) for c in sorted(self._checks.values(), key=lambda c: c.check_id)
                if c.service_id == s.id]

    def _health_service(self, req: _Req, name: str) -> _Reply:
        tags = req.multi.get("tag", [])
        passing = False
        if "passing" in req.query:
            try:
                passing = _parse_bool(req.query["passing"]) if req.query["passing"] else True
            except ValueError:
                raise _HTTPError(400, "Invalid value for ?passing") from None

        def view() -> _Reply:
            node_checks = [self._serf_health()] + [
                self._check_json(c) for c in sorted(self._checks.values(), key=lambda c: c.check_id)
                if not c.service_id]
            entries = []
            for s in self._instances(name, tags):
                checks = node_checks + self._service_checks(s)
                if passing and any(c["Status"] != PASSING for c in checks):
                    continue
                entries.append({"Node": self._node_json(), "Service": self._health_service_json(s),
                                "Checks": checks})
            return _json(entries, index=self._service_view_index(name))

        return self._blocking(req, view)

    def _health_checks(self, req: _Req, name: str) -> _Reply:
        def view() -> _Reply:
            checks = [c for s in self._instances(name, []) for c in self._service_checks(s)]
            return _json(checks, index=self._service_view_index(name))

        return self._blocking(req, view)

    def _status_leader(self, req: _Req) -> _Reply:
        return _json(f"{self._node_address()}:8300")

    def _status_peers(self, req: _Req) -> _Reply:
        return _json([f"{self._node_address()}:8300"])

    # ---- KV ------------------------------------------------------------------------------------
    # https://developer.hashicorp.com/consul/api-docs/kv

    def _kv_endpoint(self, req: _Req, key: str) -> _Reply:
        if req.method == "GET":
            if "keys" in req.query:
                return self._blocking(req, lambda: self._kv_keys_view(key, req.query))
            if "recurse" in req.query:
                return self._blocking(req, lambda: self._kv_list_view(key))
            return self._blocking(req, lambda: self._kv_get_view(key, "raw" in req.query))
        if req.method == "PUT":
            return self._kv_put(req, key)
        return self._kv_delete(req, key)

    @staticmethod
    def _entry_json(e: _KV) -> dict:
        return {"LockIndex": 0, "Key": e.key, "Flags": e.flags,
                "Value": base64.b64encode(e.value).decode() if e.value else None,
                "CreateIndex": e.create_index, "ModifyIndex": e.modify_index}

    def _prefix_index(self, prefix: str, entries: list[_KV]) -> int:
        """Consul's kvsListTxn: the highest ModifyIndex under *prefix*, tombstones included."""
        if not prefix:
            return self._kv_index or 1
        idx = max([e.modify_index for e in entries]
                  + [i for k, i in self._tombstones.items() if k.startswith(prefix)], default=0)
        return idx or self._kv_index or 1

    def _kv_get_view(self, key: str, raw: bool) -> _Reply:
        e = self._kv.get(key)
        if e is None:
            return _empty(404, index=self._kv_index or 1)
        if raw:
            return _Reply(200, e.value or b"", "application/octet-stream", e.modify_index)
        return _json([self._entry_json(e)], index=e.modify_index)

    def _kv_list_view(self, prefix: str) -> _Reply:
        entries = [e for k, e in sorted(self._kv.items()) if k.startswith(prefix)]
        index = self._prefix_index(prefix, entries)
        if not entries:
            return _empty(404, index=index)
        return _json([self._entry_json(e) for e in entries], index=index)

    def _kv_keys_view(self, prefix: str, query: dict[str, str]) -> _Reply:
        separator = query.get("separator", query.get("seperator", ""))  # Consul accepts its old typo
        entries = [e for k, e in sorted(self._kv.items()) if k.startswith(prefix)]
        index = self._prefix_index(prefix, entries)
        keys: list[str] = []
        for e in entries:
            k = e.key
            if separator:
                cut = k.find(separator, len(prefix))
                if cut >= 0:
                    k = k[: cut + len(separator)]
            if not keys or keys[-1] != k:
                keys.append(k)
        if not keys:
            return _empty(404, index=index)
        return _json(keys, index=index)

    def _kv_put(self, req: _Req, key: str) -> _Reply:
        if not key:
            raise _HTTPError(400, "Missing key name")
        if len(req.body) > KV_MAX_VALUE:
            raise _HTTPError(413, f"Request body({len(req.body)} bytes) too large, max size: "
                                  f"{KV_MAX_VALUE} bytes. See https://developer.hashicorp.com/docs/"
                                  "agent/config/config-files#kv_max_value_size.")
        flags = _parse_uint(req.query["flags"], "flag value") if req.query.get("flags") else 0
        cas = _parse_uint(req.query["cas"], "cas index") if "cas" in req.query else None
        for lock in ("acquire", "release"):
            if req.query.get(lock):
                raise _HTTPError(500, f'rpc error making call: invalid session "{req.query[lock]}"')
        with self._cond:
            e = self._kv.get(key)
            if cas is not None and ((e is None and cas != 0) or (e is not None and e.modify_index != cas)):
                return _json(False)
            idx = self._bump()
            self._kv[key] = _KV(key, req.body or None, flags, e.create_index if e else idx, idx)
            self._tombstones.pop(key, None)
            self._kv_index = idx
            self._cond.notify_all()
        return _json(True)

    def _kv_delete(self, req: _Req, key: str) -> _Reply:
        recurse = "recurse" in req.query
        if not key and not recurse:
            raise _HTTPError(400, "Missing key name")
        cas = _parse_uint(req.query["cas"], "cas index") if "cas" in req.query else None
        with self._cond:
            if recurse:
                doomed = [k for k in self._kv if k.startswith(key)]
            else:
                e = self._kv.get(key)
                if cas is not None and e is not None and e.modify_index != cas:
                    return _json(False)
                doomed = [key] if e is not None else []
            if doomed:
                idx = self._bump()
                for k in doomed:
                    del self._kv[k]
                    self._tombstones[k] = idx
                self._kv_index = idx
                self._cond.notify_all()
        return _json(True)


class _Req(NamedTuple):
    method: str
    query: dict[str, str]
    multi: dict[str, list[str]]
    body: bytes
    gen: int

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError as e:
            raise _HTTPError(400, f"Request decode failed: {e}") from None


def main(argv: list[str] | None = None) -> int:
    """Run a double until SIGTERM/SIGINT; print its URL on the first line of stdout."""
    parser = argparse.ArgumentParser(prog="python -m tests.consul_double", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8500)
    args = parser.parse_args(argv)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    double = ConsulDouble(args.host, args.port).start()
    print(double.url, flush=True)
    while not done.wait(1.0):
        pass
    double.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
