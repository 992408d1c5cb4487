"""The API's one connection to ipvs-writer, shared by every request greenlet.

One zmq.green DEALER (built by ``gorb.common.transport.RequestClient``: IMMEDIATE, no linger) carries
every request. Request greenlets never read the socket: each registers an ``AsyncResult`` under its
envelope id, sends, and waits on it; a single named reader greenlet (``writer-replies``) reads every
reply and hands it to the waiter with the same id. So two greenlets can never take each other's
replies, and a reply arriving after its waiter gave up (timed out) is dropped and counted.

Wire: ``[envelope]`` out, ``[envelope]`` back with the same id (``gorb.common.transport``); the bodies
are ``gorb.common.messages``.

A writer that does not take or answer a request within the timeout is ``WriterUnavailable`` (the
API's 503). The DEALER reconnects by itself, so once a restarted writer binds its endpoint again,
the next requests are answered: the API is never restarted for it. If the reader greenlet dies of
a bug, every request would then time out, so ``main`` stops the process (supervisord restarts it).
"""

from __future__ import annotations

import logging
from typing import Any

import gevent
import gevent.lock
import zmq
import zmq.green
from gevent.event import AsyncResult

from gorb.common.envelope import Envelope, EnvelopeError, decode, encode
from gorb.common.transport import PeerUnavailable, RequestClient

log = logging.getLogger(__name__)


class WriterUnavailable(PeerUnavailable):
    """The writer did not take or answer a request in time (HTTP 503)."""


class WriterClient:
    def __init__(self, ctx: zmq.green.Context, endpoint: str, timeout: float, src: str = "api"):
        self.endpoint = endpoint
        self.timeout = timeout
        self.src = src
        self._dealer = RequestClient(ctx, endpoint, src, timeout)
        self._socket = self._dealer.socket
        self._waiting: dict[str, AsyncResult] = {}
        # One sender at a time: the socket's POLLOUT wait is not shared between greenlets.
        self._send_lock = gevent.lock.BoundedSemaphore()
        self.stale_replies = 0
        self.bad_replies = 0
        self.reader = gevent.Greenlet(self._read)
        self.reader.name = "writer-replies"
        self.reader.start()

    def close(self) -> None:
        self.reader.kill(block=True, timeout=1)
        for result in self._waiting.values():
            result.set_exception(WriterUnavailable("the API is stopping"))
        self._waiting.clear()
        self._dealer.close()

    def request(self, type_: str, body: dict[str, Any], timeout: float | None = None) -> dict:
        """The writer's reply body (``gorb.common.messages.Reply`` as a dict) to one request."""
        timeout = self.timeout if timeout is None else timeout
        env = Envelope.new(type_, body, self.src)
        result = AsyncResult()
        # Registered before sending: the reply cannot overtake the registration.
        self._waiting[env.id] = result
        try:
            return self._exchange(encode(env), result, timeout)
        finally:
            self._waiting.pop(env.id, None)

    def _exchange(self, data: bytes, result: AsyncResult, timeout: float) -> dict:
        """Send ``data`` and wait for its reply in ``result``: one timeout for both."""
        with gevent.Timeout(timeout, WriterUnavailable(
                f"ipvs-writer did not answer within {timeout:g}s ({self.endpoint})")):
            self._send(data)
            return result.get()

    def _send(self, data: bytes) -> None:
        # IMMEDIATE: with no writer connected the send would block; wait for one (the caller's
        # Timeout bounds the wait) instead of queueing for a writer that may never come.
        with self._send_lock:
            while True:
                try:
                    self._socket.send(data, zmq.NOBLOCK)
                    return
                except zmq.Again:
                    self._socket.poll(100, zmq.POLLOUT)

    def _read(self) -> None:
        while True:
            frames = self._socket.recv_multipart()
            try:
                if len(frames) != 1:
                    raise EnvelopeError(f"expected 1 frame, got {len(frames)}")
                env = decode(frames[0])
            except EnvelopeError as exc:
                self.bad_replies += 1
                log.warning("dropping a bad reply from %s: %s", self.endpoint, exc)
                continue
            result = self._waiting.pop(env.id, None)
            if result is None:
                self.stale_replies += 1  # its request timed out: a 503 was already sent
                log.debug("dropping a late reply %s (%s)", env.id, env.type)
                continue
            result.set(env.body)
