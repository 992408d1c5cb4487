"""Entry point of ``gorb-api``: parse config, build the writer client and the app, serve, exit code.

The process holds no state: every request is forwarded to ipvs-writer over
``ipc://<runtime_dir>/writer.sock`` (the /store routes, when ``[discovery]`` configures a store, to
discovery over ``ipc://<runtime_dir>/discovery.sock``). Exit codes: 0 on SIGTERM/SIGINT, 2 for a
configuration problem or a listen address that cannot be bound, 70 when a reply-reader greenlet
died of a bug (supervisord restarts the API).

Security, from ``[api]`` (``secure``): the token secrets (``secret_file``s are read here, by this
process only, at start), the TLS certificate and key, and the audit file, opened before
serving. Any of them unusable is a configuration error: exit 2 with one line naming it. Without
tokens the API is open (GORB); listening beyond loopback that way logs a warning.

gevent: ``python -m gorb.services.api`` monkey-patches in its entry module (``__main__``) before anything
else is imported; this module only uses gevent's own APIs (pywsgi, zmq.green, gevent's resolver),
so the ``gorb-api`` console script works unpatched as well.
"""

from __future__ import annotations

import argparse
import logging
import signal
import ssl
import sys
from dataclasses import dataclass

import gevent
import zmq.green

from gorb.common import config, logs, runtime, store_messages
from gorb.common.resolver import Resolver, resolve_host
from gorb.services.api import auth
from gorb.services.api.app import build
from gorb.services.api.audit import AuditFile
from gorb.services.api.discovery_client import DiscoveryClient
from gorb.services.api.server import Server, tls_context
from gorb.services.api.writer_client import WriterClient

log = logging.getLogger("api")

# Seconds the requests in flight get to finish on SIGTERM before their connections are closed.
# Handlers run in a Pool so that stopping can wait for them: with gevent's default spawn,
# serve_forever returns at once and closing the writer client answered them 503 "the API is
# stopping" (or cut them off), so ``gorb ctl restart api`` gave clients wrong answers.
STOP_TIMEOUT = 5.0


def parse_args(argv: list[str] | None) -> tuple[config.Config, str]:
    """The effective configuration and the writer's endpoint; exits 2 on a bad one."""
    p = argparse.ArgumentParser(prog="gorb-api", description="gorb's REST API (GORB's :4672)")
    config.add_arguments(p)
    p.add_argument("--runtime-dir", help="directory of the ipc sockets (gorb.runtime_dir)")
    p.add_argument("--writer-timeout", type=float,
                   help="seconds to wait for the writer before answering 503 (api.writer_timeout)")
    p.add_argument("--log-level", choices=["debug", "info", "warning"])
    args = p.parse_args(argv)
    try:
        cfg = config.from_args(args, overrides={"runtime_dir": "gorb", "log_level": "gorb",
                                                "writer_timeout": "api"})
        endpoint = runtime.endpoint(cfg.gorb.runtime_dir, runtime.WRITER)
    except (config.ConfigError, ValueError) as exc:
        p.exit(2, f"gorb-api: {exc}\n")
    return cfg, endpoint


def secure(api: config.ApiSection) -> tuple[auth.Tokens, ssl.SSLContext | None,
                                             AuditFile | None]:
    """The tokens, the TLS context and the audit file of ``[api]``; ConfigError if unusable."""
    tokens = auth.load_tokens(api.tokens)
    if bool(api.tls_cert) != bool(api.tls_key):  # the file loader checks it; the env does not
        raise config.ConfigError("api.tls_cert and api.tls_key must be set together")
    tls = tls_context(api.tls_cert, api.tls_key) if api.tls_cert else None
    audit_file = None
    if api.audit_log:
        try:
            audit_file = AuditFile(api.audit_log)
        except OSError as exc:
            raise config.ConfigError(f"api.audit_log: cannot open {api.audit_log}: "
                                     f"{exc.strerror or exc}") from None
    host, _ = config.parse_listen(api.listen)
    if not tokens and not auth.is_loopback(host):
        log.warning("no [api.tokens] configured: the API on %s is open to anyone who can reach "
                    "it (GORB-compatible); configure tokens to require them", api.listen)
    return tokens, tls, audit_file


@dataclass
class Peers:
    """What the API holds open: its ZeroMQ context, the writer's and discovery's clients, the
    audit file. ``close()`` closes them all."""

    ctx: zmq.green.Context
    client: WriterClient
    discovery: DiscoveryClient | None
    audit_file: AuditFile | None

    def close(self) -> None:
        for part in (self.client, self.discovery, self.audit_file):
            if part is not None:
                part.close()
        self.ctx.destroy(linger=0)


def connect(cfg: config.Config, endpoint: str, audit_file: AuditFile | None) -> Peers:
    ctx = zmq.green.Context()
    discovery = None  # without a store the /store routes answer 404 without asking discovery
    if cfg.discovery.kv_prefix or cfg.discovery.store_dir:
        discovery = DiscoveryClient(ctx, store_messages.endpoint(cfg.gorb.runtime_dir))
    return Peers(ctx, WriterClient(ctx, endpoint, cfg.api.writer_timeout), discovery, audit_file)


def serve(server: Server, peers: Peers) -> int:
    """Serve until SIGTERM/SIGINT (0) or a reply reader dies (70)."""
    code = 0

    def stop(reason: str) -> None:
        log.info("%s: stopping", reason)
        server.close()  # no new connections; serve_forever then waits for the pool

    def reader_died(greenlet: gevent.Greenlet) -> None:
        nonlocal code
        log.error("the %s greenlet died: %r; exiting for supervisord to restart the API",
                  greenlet.name, greenlet.exception)
        code = 70
        stop("internal error")

    peers.client.reader.link_exception(reader_died)
    if peers.discovery is not None:
        peers.discovery.reader.name = "discovery-replies"
        peers.discovery.reader.link_exception(reader_died)
    gevent.signal_handler(signal.SIGTERM, stop, "SIGTERM")
    gevent.signal_handler(signal.SIGINT, stop, "SIGINT")
    server.serve_forever(stop_timeout=STOP_TIMEOUT)
    return code


def main(argv: list[str] | None = None, resolve: Resolver = resolve_host) -> int:
    """``resolve`` turns host names into addresses (tests pass one that needs no DNS)."""
    cfg, endpoint = parse_args(argv)
    logs.setup(cfg.gorb.log_level)
    try:
        tokens, tls, audit_file = secure(cfg.api)
    except config.ConfigError as exc:
        log.error("configuration: %s", exc)
        return 2
    peers = connect(cfg, endpoint, audit_file)
    try:
        _, wsgi = build(peers.client, resolve, discovery=peers.discovery, tokens=tokens,
                        audit_file=audit_file, metrics_ttl=cfg.writer.stats_interval)
        server = Server(config.parse_listen(cfg.api.listen), wsgi, cfg.api.idle_timeout,
                        cfg.api.max_connections, tls=tls)
        try:
            server.init_socket()
        except OSError as exc:
            log.error("cannot listen on %s: %s", cfg.api.listen, exc)
            return 2
        log.info("setting up %s server on %s (writer %s, auth %s, audit %s)",
                 "HTTPS" if tls else "HTTP", cfg.api.listen, endpoint,
                 "on" if tokens else "off", cfg.api.audit_log or "off")
        return serve(server, peers)
    finally:
        peers.close()


if __name__ == "__main__":
    sys.exit(main())
