"""gevent's WSGIServer as gorb serves the API: what a long-running HTTP front end needs beyond
the app.

- **Idle timeout** (``api.idle_timeout``): every client socket gets it as its timeout, so a
  connection that sends no request (an idle keep-alive, a client that died without closing) or
  sends one too slowly (headers or body trickling in) is closed instead of holding a greenlet
  and a file descriptor forever. A request line that never comes closes quietly; headers that
  stop coming are answered 408.
- **Bounded connections** (``api.max_connections``): the handler pool has that size; when it is
  full the server stops accepting and further connections wait in the kernel's listen backlog
  until one is free.
- **JSON for gevent's own errors**: a request gevent cannot parse (bad request line, bad header)
  is answered ``{"error": ...}`` like every other error of the API, not gevent's empty 400.
- gevent's access line is not formatted (``app.AccessLog`` writes gorb's).
- **TLS** (``api.tls_cert`` / ``api.tls_key``, ``tls_context``): HTTPS on the same listener,
  TLS 1.2 or later. The handshake runs in the connection's greenlet under the idle timeout, so a
  client that connects and never completes it (or speaks plain HTTP to the port) is closed with
  one log line, not kept; after it, everything above holds unchanged inside TLS.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable

from gevent import ssl as gevent_ssl
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer

from gorb.common.config import ConfigError
from gorb.services.api import views

log = logging.getLogger("api")


def _raw(status: str, error: str) -> bytes:
    body = views.encode({"error": error})
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class Handler(WSGIHandler):
    def log_request(self) -> None:
        """gevent would format an access line (a clock read and a datetime) even with
        ``log=None``; ``app.AccessLog`` writes gorb's."""

    def _handle_client_error(self, ex: Exception) -> tuple[str, bytes]:
        """A request gevent itself cannot take: 408 when its headers stopped coming, else
        400; one log line, never gevent's traceback on stderr."""
        if isinstance(ex, TimeoutError):  # socket.timeout is TimeoutError
            log.info("closing %s: request headers not received within the idle timeout",
                     self.client_address)
            return "408", _raw("408 Request Timeout",
                               "request not received within the idle timeout")
        log.info("bad request from %s: %s", self.client_address, ex)
        return "400", _raw("400 Bad Request", f"malformed HTTP request: {ex}")


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """The server context of a PEM certificate (chain) and its key; ConfigError when either
    cannot be read or they do not match. gevent's own SSLContext: its sockets are cooperative
    without monkey-patching."""
    for name, path in (("api.tls_cert", cert), ("api.tls_key", key)):
        try:  # load_cert_chain's OSError does not say which file
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"{name}: cannot read {path}: {exc.strerror or exc}") from None
    ctx = gevent_ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ConfigError(f"api.tls_cert {cert} and api.tls_key {key}: not a PEM certificate "
                          f"and its private key ({reason})") from None
    return ctx


class Server(WSGIServer):
    """``WSGIServer`` with gorb's handler, an idle timeout on every connection and at most
    ``max_connections`` served at once; HTTPS with ``tls`` (``tls_context``)."""

    def __init__(self, listener: tuple[str, int], app: Callable, idle_timeout: float,
                 max_connections: int, error_log: logging.Logger = log,
                 tls: ssl.SSLContext | None = None):
        ssl_args = {} if tls is None else {"ssl_context": tls}
        super().__init__(listener, app, log=None, error_log=error_log,
                         spawn=Pool(max_connections), handler_class=Handler, **ssl_args)
        self.idle_timeout = idle_timeout

    def handle(self, sock: socket.socket, address: tuple) -> None:
        sock.settimeout(self.idle_timeout)
        super().handle(sock, address)

    def wrap_socket_and_handle(self, client_socket: socket.socket, address: tuple) -> None:
        """gevent's, with the idle timeout on the handshake and a failed one (a timeout, plain
        HTTP, a client refusing the certificate) logged and closed instead of a traceback."""
        client_socket.settimeout(self.idle_timeout)
        try:
            tls_socket = self.wrap_socket(client_socket, **self.ssl_args)
        except (OSError, ValueError) as exc:  # ssl.SSLError and TimeoutError are OSErrors
            log.info("closing %s: TLS handshake failed: %s", address,
                     "not completed within the idle timeout" if isinstance(exc, TimeoutError)
                     else exc)
            client_socket.close()
            return
        try:
            self.handle(tls_socket, address)
        finally:
            tls_socket.close()
