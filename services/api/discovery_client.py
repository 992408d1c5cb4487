"""The API's connection to discovery's control socket, for ``GET /store/sync[/status]``.

Wire: the store family of ``gorb.common.store_messages`` (``store.sync {"force": bool}``,
``store.status {}``) as envelopes to the ROUTER that ``discovery`` binds at
``ipc://<runtime_dir>/discovery.sock``; replies are ``gorb.common.messages.Reply`` dicts.

The machinery is ``WriterClient``'s (one DEALER, one reader greenlet handing replies to waiters by
envelope id); only the waiting differs, in two phases:

    send   at most ``connect_timeout`` (2 s): with IMMEDIATE, a send waits for a connected peer,
           and no peer means discovery is not running -> 503 at once, not after the sync timeout
    reply  at most ``timeout`` (35 s): a sync applies a whole round (writer commands, KV
           write-backs) and discovery queues requests behind a running round for up to 30 s
           (``gorb.services.discovery.syncer.Syncer.request``), so its own "busy" answer arrives
           before this gives up

Either wait running out is ``DiscoveryUnavailable`` (the API's 503).
"""

from __future__ import annotations

import gevent
import zmq.green
from gevent.event import AsyncResult

from gorb.common.transport import PeerUnavailable
from gorb.services.api.writer_client import WriterClient

CONNECT_TIMEOUT = 2.0
SYNC_TIMEOUT = 35.0


class DiscoveryUnavailable(PeerUnavailable):
    """discovery is not running, or did not answer in time (HTTP 503)."""


class DiscoveryClient(WriterClient):
    def __init__(self, ctx: zmq.green.Context, endpoint: str, timeout: float = SYNC_TIMEOUT,
                 connect_timeout: float = CONNECT_TIMEOUT, src: str = "api"):
        super().__init__(ctx, endpoint, timeout, src)
        self.connect_timeout = connect_timeout

    def _exchange(self, data: bytes, result: AsyncResult, timeout: float) -> dict:
        """discovery's reply; ``DiscoveryUnavailable`` if it has none (the two waits above)."""
        with gevent.Timeout(self.connect_timeout, DiscoveryUnavailable(
                f"discovery is not running (nothing listens on {self.endpoint})")):
            self._send(data)
        with gevent.Timeout(timeout, DiscoveryUnavailable(
                f"discovery did not answer within {timeout:g}s")):
            return result.get()
