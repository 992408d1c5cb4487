"""The API's connection to discovery's control socket, for ``GET /store/sync[/status]``.

Wire: the store family of ``common.store_messages`` (``store.sync {"force": bool}``,
``store.status {}``) as envelopes to the ROUTER that ``discovery`` binds at
``ipc://<runtime_dir>/discovery.sock``; replies are ``common.messages.Reply`` dicts.

The machinery is ``WriterClient``'s (one DEALER, one reader greenlet handing replies to waiters by
envelope id); only the waiting differs, in two phases:

    send   at most ``connect_timeout`` (2 s): with IMMEDIATE, a send waits for a connected peer,
           and no peer means discovery is not running -> 503 at once, not after the sync timeout
    reply  at most ``timeout`` (35 s): a sync applies a whole round (writer commands, KV
           write-backs) and discovery queues requests behind a running round for up to 30 s
           (``services.discovery.syncer.Syncer.request``), so its own "busy" answer arrives
           before this gives up

Either wait running out is ``DiscoveryUnavailable`` (the API's 503).
"""

from __future__ import annotations

from typing import Any

import gevent
import zmq.green
from gevent.event import AsyncResult

from common.envelope import Envelope, encode
from services.api.writer_client import WriterClient

CONNECT_TIMEOUT = 2.0
SYNC_TIMEOUT = 35.0


class DiscoveryUnavailable(Exception):
    """discovery is not running, or did not answer in time (HTTP 503)."""


class DiscoveryClient(WriterClient):
    def __init__(self, ctx: zmq.green.Context, endpoint: str, timeout: float = SYNC_TIMEOUT,
                 connect_timeout: float = CONNECT_TIMEOUT, src: str = "api"):
        super().__init__(ctx, endpoint, timeout, src)
        self.connect_timeout = connect_timeout

    def request(self, type_: str, body: dict[str, Any], timeout: float | None = None) -> dict:
        """discovery's reply body to one request; ``DiscoveryUnavailable`` if it has none."""
        timeout = self.timeout if timeout is None else timeout
        env = Envelope.new(type_, body, self.src)
        result = AsyncResult()
        self._waiting[env.id] = result
        try:
            with gevent.Timeout(self.connect_timeout, DiscoveryUnavailable(
                    f"discovery is not running (nothing listens on {self.endpoint})")):
                with self._send_lock:
                    self._send(encode(env))
            with gevent.Timeout(timeout, DiscoveryUnavailable(
                    f"discovery did not answer within {timeout:g}s")):
                return result.get()
        finally:
            self._waiting.pop(env.id, None)
