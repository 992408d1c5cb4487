"""The API's audit log (``[api] audit_log``): one JSON line per request that changes state (PUT,
PATCH, DELETE, ``GET /store/sync``, and any other method but GET/HEAD: a POST is an attempt too),
served or refused (401, 403, 400, 404, 405, 409, 413, 500, 503 ...). "" turns it off.

A line (keys always present, in this order)::

    {"time": "2026-12-02T08:00:00.123Z",       ISO 8601, UTC, milliseconds
     "token": "deploy" | null,                 the client's token name; null: auth off, or no
                                               valid token (then status is 401)
     "peer": "10.0.0.5",                       REMOTE_ADDR
     "method": "PUT", "route": "/service/<vs>/<rs>" | null,   the pattern; null: no such route
     "ids": {"vs": "web", "rs": "a"},          the path's ids as sent (only those present)
     "body": {...} | null,                     the body as validated and normalised (the
                                               options, a PATCH's fields, {"weight": n},
                                               /store/sync's {"force": b}); null when it did not
                                               validate or there is none
     "raw": {"bytes": 31, "head": "{\"port\": 8"} | null,   a body that did not validate: its
                                               size and its first 64 characters, no more
     "status": 409, "error": "specified object already exists" | null,
     "change": {"/service/web/a": {"before": {...} | null, "after": {...} | null}} | null}
                                               the writer's account of what it changed
                                               (``gorb.common.messages``); null when nothing did

The routes put ``body``, ``raw`` and ``change`` in ``environ[AUDIT]``; the status and the error
text are taken from the response itself, so a refusal from anywhere (auth, bottle's router, the
error choke point) is logged the same way. The secret of the request never reaches this module
(``auth.Authenticate`` removed the header).

``AuditFile`` appends each line with one ``write()`` on an ``O_APPEND`` descriptor (whole lines,
even with several writers) and reopens the path when it was moved or removed (logrotate, as
``logging.handlers.WatchedFileHandler`` does); until the path can be opened again (the API may
not create files in a log dir of root's) lines go on into the moved file, so none is lost. A file that cannot be opened at start is the
caller's configuration error (an API that cannot audit must not serve); a write that fails later
is logged and the request answered as usual.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import bottle
import msgspec

from gorb.services.api.auth import TOKEN, changes_state, route_of

log = logging.getLogger("api")

AUDIT = "gorb.audit"  # environ key: {"body", "raw", "change"} as the route found them
RAW_HEAD = 64  # characters of a body that did not validate


def note(**fields: Any) -> None:
    """From a route: record ``body``, ``raw`` or ``change`` for this request's audit line."""
    bottle.request.environ.setdefault(AUDIT, {}).update(fields)


def raw_of(data: bytes) -> dict[str, Any] | None:
    """A body's size and head, for a line whose body did not validate."""
    if not data:
        return None
    return {"bytes": len(data), "head": data[:RAW_HEAD * 4].decode("utf-8", "replace")[:RAW_HEAD]}


def iso_utc(now: float) -> str:
    return datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def error_text(status: int, body: bytes) -> str | None:
    """The ``error`` of a refusal's JSON body (the API's one error shape)."""
    if status < 400:
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value.get("error") if isinstance(value, dict) else None


def entry(now: float, environ: dict, rule: str | None, args: dict[str, str], status: int,
          error: str | None) -> dict[str, Any]:
    """One audit line as a dict (pure: everything comes in)."""
    noted = environ.get(AUDIT, {})
    body = noted.get("body")
    return {
        "time": iso_utc(now),
        "token": environ.get(TOKEN),
        "peer": environ.get("REMOTE_ADDR"),
        "method": environ.get("REQUEST_METHOD"),
        "route": rule,
        "ids": {k: args[k] for k in ("vs", "rs") if k in args},
        "body": body,
        "raw": None if body is not None else noted.get("raw"),
        "status": status,
        "error": error,
        "change": noted.get("change"),
    }


class AuditFile:
    """An append-only file of lines, reopened when logrotate moved it away."""

    def __init__(self, path: str):
        self.path = path
        self._fd = -1
        self._id: tuple[int, int] | None = None
        self._open()  # OSError: the caller's exit 2

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        st = os.fstat(fd)
        self._fd, self._id = fd, (st.st_dev, st.st_ino)

    def _reopen_if_moved(self) -> None:
        try:
            st = os.stat(self.path)
            if self._fd >= 0 and (st.st_dev, st.st_ino) == self._id:
                return
        except FileNotFoundError:
            pass
        old = self._fd
        try:
            self._open()
        except OSError:
            if old < 0 or os.fstat(old).st_nlink == 0:
                raise
            # Moved, and no new file we may create yet (the log dir is root's: logrotate's
            # "create" makes it a moment later): go on appending to the moved file meanwhile.
            return
        if old >= 0:
            os.close(old)

    def write(self, line: bytes) -> bool:
        """Append one line (one ``write()``); False, logged, when the file system refused."""
        try:
            self._reopen_if_moved()
            view = memoryview(line)
            while view:  # a short write (file system full) leaves the rest: try it, then fail
                view = view[os.write(self._fd, view):]
            return True
        except OSError as exc:
            log.error("cannot write the audit log %s: %s", self.path, exc)
            return False

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Audit:
    """WSGI middleware: the audit line of every state-changing request, after its response."""

    def __init__(self, app: Callable, sink: AuditFile, router: bottle.Router,
                 clock: Callable[[], float] = time.time):
        self.app = app
        self.sink = sink
        self.router = router
        self.clock = clock

    def __call__(self, environ: dict, start_response: Callable) -> Any:
        method = environ.get("REQUEST_METHOD", "")
        rule, args = route_of(self.router, environ)
        if not changes_state(method, rule):
            return self.app(environ, start_response)
        seen: dict[str, int] = {}

        def start(status: str, headers: list, exc_info: Any = None) -> Any:
            seen["status"] = int(status.split(" ", 1)[0])
            return start_response(status, headers, exc_info) if exc_info else \
                start_response(status, headers)

        try:
            result = self.app(environ, start)
            try:
                chunks = list(result)  # small: empty, an error, a sync result
            finally:
                if hasattr(result, "close"):
                    result.close()
        except Exception:
            self._write(environ, rule, args, 500, "internal error")  # AccessLog answers it
            raise
        status = seen.get("status", 500)
        self._write(environ, rule, args, status, error_text(status, b"".join(chunks)))
        return chunks

    def _write(self, environ: dict, rule: str | None, args: dict, status: int,
               error: str | None) -> None:
        line = entry(self.clock(), environ, rule, args, status, error)
        self.sink.write(msgspec.json.encode(line) + b"\n")
