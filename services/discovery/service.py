"""Assembly of the discovery process from its configuration: which loops run, on which sockets.

    events     SUB on the writer's events: wakes the registrar (every service/backend event,
               health included) and the Consul store's sync (configuration events only)
    register   (``discovery.consul`` set) the registration loop, ``registrar.Registrar``
    watch      (a store configured) Consul blocking queries on the KV prefix, or polling of
               ``store_dir``: wakes the sync on every change
    sync       (a store configured) the store sync, ``syncer.Syncer``
    control    the ROUTER of ``gorb.common.store_messages`` (always: without a store it answers 404)

Each Consul-facing loop has its own adapter (its own HTTP session) and each writer-facing loop its
own DEALER, so no loop ever waits on another's connection. ``check`` validates the
``[discovery]`` section beyond its types (``gorb.common.config`` only knows the types).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

import gevent

from gorb.common import runtime, store_messages
from gorb.common.config import ConfigError, DiscoverySection
from gorb.common.resolver import resolve_host
from gorb.common.transport import RequestClient, RouterServer, Subscriber
from gorb.services.discovery import registry
from gorb.services.discovery.blocking import Backoff
from gorb.services.discovery.consul_adapter import ConsulAdapter, parse_url
from gorb.services.discovery.control import ControlServer
from gorb.services.discovery.registrar import Registrar
from gorb.services.discovery.stores import ConsulStore, FileStore
from gorb.services.discovery.syncer import Syncer

log = logging.getLogger("discovery")
SRC = "discovery"
_PREFIX_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./")
# Writer events that change configuration (not backend.<vs>.<rs>.health, pulse or reconcile).
_CONFIG_VERBS = (".created", ".updated", ".deleted")


def check(section: DiscoverySection) -> None:
    """ConfigError for a ``[discovery]`` section that cannot work."""
    if section.consul:
        parse_url(section.consul)
    try:
        ids = {registry.service_id(vs, "h", section.id_format) for vs in ("a", "b")}
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"discovery.id_format {section.id_format!r}: {exc!r}; use {{service}} "
                          "and {host}") from None
    if len(ids) != 2:
        raise ConfigError(f"discovery.id_format {section.id_format!r} must contain {{service}}")
    if section.kv_prefix:
        if not section.consul:
            raise ConfigError("discovery.kv_prefix needs discovery.consul (the agent's URL)")
        if not section.kv_prefix.strip("/") or not set(section.kv_prefix) <= _PREFIX_CHARS:
            raise ConfigError(f"discovery.kv_prefix {section.kv_prefix!r}: use letters, digits "
                              "and - _ . /")
    if section.kv_prefix and section.store_dir:
        raise ConfigError("discovery.kv_prefix and discovery.store_dir: configure one store")
    if not 0 <= section.max_delete_share <= 1:
        raise ConfigError("discovery.max_delete_share must be between 0 and 1")
    for name in ("check_interval", "retry_max", "store_poll"):
        if getattr(section, name) <= 0:
            raise ConfigError(f"discovery.{name} must be positive")


class Discovery:
    def __init__(self, section: DiscoverySection, ctx, runtime_dir: str,
                 resolve: Callable[[str], str] | None = None):
        check(section)
        hostname = section.hostname or socket.gethostname()
        writer = runtime.endpoint(runtime_dir, runtime.WRITER)

        def backoff() -> Backoff:
            return Backoff(first=min(0.5, section.retry_max), cap=section.retry_max)

        def consul() -> ConsulAdapter:
            return ConsulAdapter(section.consul, section.token)

        self.registrar = None
        if section.consul:
            self.registrar = Registrar(consul(), RequestClient(ctx, writer, f"{SRC}-register"),
                                       hostname, section.check_interval, backoff(),
                                       id_format=section.id_format)
        self.store = None
        if section.kv_prefix:
            self.store = ConsulStore(consul(), consul(), section.kv_prefix)
        elif section.store_dir:
            self.store = FileStore(section.store_dir, section.store_poll)
        self.syncer = None
        if self.store is not None:
            self.syncer = Syncer(self.store, RequestClient(ctx, writer, f"{SRC}-sync"),
                                 section.max_delete_share, resolve or resolve_host, backoff(),
                                 resync=30.0 if self.store.writable else None)
        self.watch_backoff = backoff()
        self.subscriber = Subscriber(ctx, runtime.endpoint(runtime_dir, runtime.EVENTS),
                                     ("service.", "backend."))
        # The one socket it binds lives in a directory of its own account (gorb.common.runtime;
        # gorb run makes it when it drops privileges, since the runtime dir is not ours then).
        runtime.ensure_runtime_dir(os.path.join(runtime_dir, runtime.DISCOVERY_DIR))
        self.control = ControlServer(RouterServer(ctx, store_messages.endpoint(runtime_dir)),
                                     self.syncer)
        log.info("discovery on %s: registration %s, store %s", hostname,
                 section.consul or "off", self.store.location if self.store else "none")

    def events_loop(self) -> None:
        while True:
            got = self.subscriber.recv(timeout=None)
            if got is None:
                continue
            topic, _ = got
            if self.registrar is not None:
                self.registrar.wake()
            if self.syncer is not None and self.store.writable and topic.endswith(_CONFIG_VERBS):
                self.syncer.wake()

    def watch_loop(self) -> None:
        self.store.watch(self.syncer.wake, self.watch_backoff, gevent.sleep)

    def loops(self) -> list[gevent.Greenlet]:
        names = [("events", self.events_loop), ("control", self.control.loop)]
        if self.registrar is not None:
            names.append(("register", self.registrar.loop))
        if self.syncer is not None:
            names += [("watch", self.watch_loop), ("sync", self.syncer.loop)]
        greenlets = []
        for name, fn in names:
            g = gevent.Greenlet(fn)
            g.name = name
            greenlets.append(g)
        return greenlets
