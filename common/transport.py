"""Thin pyzmq wrappers for gorb's three bus patterns; every message carries one envelope.

Frames on the wire (``env`` is ``gorb.common.envelope.encode`` output)::

    request        DEALER -> ROUTER   [env]
    reply          ROUTER -> DEALER   [env]               same id, type = request type + ".reply"
    events         PUB -> SUB         [topic utf-8, env]   topic e.g. "service.web.created"
    health         PUSH -> PULL       [env]

Every class takes the ``zmq.Context`` to build its socket from, so a gevent process passes a
``zmq.green`` context and gets cooperative sockets; this module never imports gevent. Waiting is
done with ``socket.poll`` for the same reason. Timeouts are in seconds; ``None`` waits forever.

Error tiers: a peer that does not answer is a ``TransportTimeout`` (the caller retries); bytes that
are not an envelope arriving at a bound socket are logged and counted in ``bad_messages``, never
raised, so one bad peer cannot stop a server.
"""

from __future__ import annotations

import logging
import math
import os
import socket as pysocket
import stat
import time
from typing import Any

import zmq

from gorb.common.envelope import Envelope, EnvelopeError, decode, encode

log = logging.getLogger(__name__)

SOCKET_FILE_MODE = 0o770  # connecting needs w; x is meaningless on a socket (gorb.common.runtime)


class TransportError(Exception):
    """The bus could not carry a message (bind failed, peer sent garbage, ...)."""


class PeerUnavailable(TransportError):
    """A peer process (the writer, discovery) did not take or answer a request in time, or
    cannot serve it: the one error every bus client raises for it (the API's 503, discovery's
    and pulse's retry). The message says which peer and why."""


class TransportTimeout(PeerUnavailable):
    """No peer took or answered a message within the timeout."""


def _ms(timeout: float | None) -> int | None:
    return None if timeout is None else max(0, math.ceil(timeout * 1000))


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _ipc_path(endpoint: str) -> str | None:
    return endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead process; refuse if a live process still listens on it.

    libzmq unlinks an existing file before binding, which would silently steal the endpoint from a
    running writer; probing first turns that into an error.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise TransportError(f"{path} exists and is not a socket")
    probe = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listening: left behind by a dead process
        return
    except OSError as exc:
        raise TransportError(f"cannot probe existing socket {path}: {exc}") from exc
    finally:
        probe.close()
    raise TransportError(f"{path} is in use by a live process")


def _bind(sock: zmq.Socket, endpoint: str) -> None:
    path = _ipc_path(endpoint)
    if path is not None:
        _clear_stale_socket(path)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        raise TransportError(f"cannot bind {endpoint}: {exc}") from exc
    if path is not None:
        os.chmod(path, SOCKET_FILE_MODE)


class _Socket:
    """Owns one zmq socket: closing, context-manager support and bad-message accounting."""

    def __init__(self, ctx: zmq.Context, kind: int) -> None:
        self.socket = ctx.socket(kind)
        # Unsent messages must not keep a stopping process alive.
        self.socket.setsockopt(zmq.LINGER, 0)
        self.bad_messages = 0

    def close(self) -> None:
        self.socket.close(linger=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _decode_or_count(self, data: bytes, peer: str) -> Envelope | None:
        try:
            return decode(data)
        except EnvelopeError as exc:
            self.bad_messages += 1
            log.warning("dropping bad message from %s: %s", peer, exc)
            return None

    def _send_within(self, frames: list[bytes], timeout: float | None, what: str) -> None:
        """Send once the socket can take the frames; ``TransportTimeout`` if not within timeout.

        The send is tried first and polled for only when it would block: a poll per message is
        a system call per message, which is what bounds throughput (UML makes it plain)."""
        try:
            self.socket.send_multipart(frames, zmq.NOBLOCK)
            return
        except zmq.Again:
            pass
        if not self.socket.poll(_ms(timeout), zmq.POLLOUT):
            raise TransportTimeout(f"no peer ready to take {what} within {timeout}s")
        self.socket.send_multipart(frames, zmq.NOBLOCK)

    def _recv_frames(self, deadline: float | None) -> list[bytes] | None:
        """The next message's frames, waiting until ``deadline``; None on timeout."""
        try:
            return self.socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            pass
        if not self.socket.poll(_ms(_remaining(deadline))):
            return None
        return self.socket.recv_multipart(zmq.NOBLOCK)


class RequestClient(_Socket):
    """DEALER client of a ROUTER: one request out, the reply with the same id back.

    ``request`` is the simple path. For pipelining, ``send`` many and then ``recv_reply`` each id in
    any order: replies for other pending ids are kept until asked for, replies for ids no longer
    pending (their request timed out) are dropped and counted in ``stale_replies``.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, src: str, timeout: float = 5.0) -> None:
        super().__init__(ctx, zmq.DEALER)
        # IMMEDIATE: with no connected writer, sending times out now instead of queueing a request
        # that would reach a restarted writer long after the caller gave up.
        self.socket.setsockopt(zmq.IMMEDIATE, 1)
        self.socket.connect(endpoint)
        self.endpoint = endpoint
        self.src = src
        self.timeout = timeout
        self.stale_replies = 0
        self._pending: set[str] = set()
        self._replies: dict[str, dict[Any, Any]] = {}

    def request(
        self, type: str, body: dict[Any, Any], timeout: float | None = None
    ) -> dict[Any, Any]:
        """Send a request and return its reply's body; ``TransportTimeout`` after ``timeout``."""
        timeout = self.timeout if timeout is None else timeout
        deadline = _deadline(timeout)
        req_id = self.send(type, body, timeout)
        return self.recv_reply(req_id, _remaining(deadline))

    def send(self, type: str, body: dict[Any, Any], timeout: float | None = None) -> str:
        """Send a request without waiting for its reply; returns its id for ``recv_reply``."""
        env = Envelope.new(type, body, self.src)
        self._send_within([encode(env)], self.timeout if timeout is None else timeout, type)
        self._pending.add(env.id)
        return env.id

    def recv_reply(self, req_id: str, timeout: float | None = None) -> dict[Any, Any]:
        """The reply body for ``req_id``; on timeout the id stops being pending, so its late reply
        is counted as stale. A reply that is not an envelope raises ``TransportError``."""
        if req_id in self._replies:
            self._pending.discard(req_id)
            return self._replies.pop(req_id)
        deadline = _deadline(self.timeout if timeout is None else timeout)
        while True:
            frames = self._recv_frames(deadline)
            if frames is None:
                self._pending.discard(req_id)
                raise TransportTimeout(f"no reply to {req_id} from {self.endpoint}")
            try:
                if len(frames) != 1:
                    raise EnvelopeError(f"expected 1 frame, got {len(frames)}")
                env = decode(frames[0])
            except EnvelopeError as exc:
                raise TransportError(f"bad reply from {self.endpoint}: {exc}") from exc
            if env.id == req_id:
                self._pending.discard(req_id)
                return env.body
            if env.id in self._pending:
                self._replies[env.id] = env.body
            else:
                self.stale_replies += 1


class RouterServer(_Socket):
    """ROUTER bound for requests; ``socket`` may be registered in the caller's own poller."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        super().__init__(ctx, zmq.ROUTER)
        _bind(self.socket, endpoint)

    def recv(self, timeout: float | None = 0.0) -> tuple[bytes, Envelope] | None:
        """The next good ``(identity, envelope)`` within ``timeout``, or None; skips bad ones."""
        deadline = _deadline(timeout)
        while self.socket.poll(_ms(_remaining(deadline))):
            got = self._recv_one()
            if got is not None:
                return got
        return None

    def recv_many(self, max_n: int) -> list[tuple[bytes, Envelope]]:
        """Up to ``max_n`` already-queued messages without blocking; bad ones count toward it."""
        out = []
        for _ in range(max_n):
            try:
                got = self._recv_one()
            except zmq.Again:
                break
            if got is not None:
                out.append(got)
        return out

    def _recv_one(self) -> tuple[bytes, Envelope] | None:
        frames = self.socket.recv_multipart(zmq.NOBLOCK)
        if len(frames) != 2:
            self.bad_messages += 1
            log.warning("dropping request of %d frames (want identity + envelope)", len(frames))
            return None
        identity, data = frames
        env = self._decode_or_count(data, f"peer {identity.hex()}")
        return None if env is None else (identity, env)

    def reply(self, identity: bytes, request_env: Envelope, body: dict[Any, Any], src: str) -> None:
        """Send ``body`` back as ``<request type>.reply`` with the request's id.

        A ROUTER drops messages to peers that are gone, so this never blocks or raises for that.
        """
        env = Envelope.new(f"{request_env.type}.reply", body, src, id=request_env.id)
        self.socket.send_multipart([identity, encode(env)])


class Publisher(_Socket):
    """PUB bound for events; subscribers filter on topic prefixes (``service.web.``)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, src: str) -> None:
        super().__init__(ctx, zmq.PUB)
        _bind(self.socket, endpoint)
        self.src = src

    def publish(self, topic: str, type: str, body: dict[Any, Any]) -> str:
        """Send ``[topic, envelope]`` to current subscribers; returns the envelope's id.

        PUB never blocks: a subscriber that is not connected yet or is too slow misses the event.
        """
        env = Envelope.new(type, body, self.src)
        self.socket.send_multipart([topic.encode(), encode(env)])
        return env.id


class Subscriber(_Socket):
    """SUB connected to a Publisher, receiving topics that start with any of ``topics``."""

    def __init__(self, ctx: zmq.Context, endpoint: str, topics: tuple[str, ...] = ("",)) -> None:
        super().__init__(ctx, zmq.SUB)
        for topic in topics:
            self.socket.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self.socket.connect(endpoint)

    def recv(self, timeout: float | None = 0.0) -> tuple[str, Envelope] | None:
        """The next good ``(topic, envelope)`` within ``timeout``, or None; bad ones are skipped."""
        deadline = _deadline(timeout)
        while self.socket.poll(_ms(_remaining(deadline))):
            frames = self.socket.recv_multipart(zmq.NOBLOCK)
            if len(frames) != 2:
                self.bad_messages += 1
                log.warning("dropping event of %d frames (want topic + envelope)", len(frames))
                continue
            try:
                topic = frames[0].decode()
            except UnicodeDecodeError as exc:
                self.bad_messages += 1
                log.warning("dropping event with non-utf-8 topic: %s", exc)
                continue
            env = self._decode_or_count(frames[1], f"topic {topic!r}")
            if env is not None:
                return topic, env
        return None


class Pusher(_Socket):
    """PUSH connected to a Puller, for batched results that a later full resend supersedes."""

    def __init__(self, ctx: zmq.Context, endpoint: str, src: str, timeout: float = 5.0) -> None:
        super().__init__(ctx, zmq.PUSH)
        # IMMEDIATE: while the puller is down, sends time out rather than pile up stale results.
        self.socket.setsockopt(zmq.IMMEDIATE, 1)
        self.socket.connect(endpoint)
        self.src = src
        self.timeout = timeout

    def send(self, type: str, body: dict[Any, Any], timeout: float | None = None) -> str:
        """Send one envelope; ``TransportTimeout`` if no puller takes it in time. Returns its id."""
        env = Envelope.new(type, body, self.src)
        self._send_within([encode(env)], self.timeout if timeout is None else timeout, type)
        return env.id


class Puller(_Socket):
    """PULL bound for results from any number of Pushers."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        super().__init__(ctx, zmq.PULL)
        _bind(self.socket, endpoint)

    def recv(self, timeout: float | None = 0.0) -> Envelope | None:
        """The next good envelope within ``timeout``, or None; bad ones are skipped."""
        deadline = _deadline(timeout)
        while self.socket.poll(_ms(_remaining(deadline))):
            env = self._recv_one()
            if env is not None:
                return env
        return None

    def recv_many(self, max_n: int) -> list[Envelope]:
        """Up to ``max_n`` already-queued envelopes without blocking; bad ones count toward it."""
        out = []
        for _ in range(max_n):
            try:
                env = self._recv_one()
            except zmq.Again:
                break
            if env is not None:
                out.append(env)
        return out

    def _recv_one(self) -> Envelope | None:
        frames = self.socket.recv_multipart(zmq.NOBLOCK)
        if len(frames) != 1:
            self.bad_messages += 1
            log.warning("dropping pushed message with %d frames (expected 1)", len(frames))
            return None
        return self._decode_or_count(frames[0], "pusher")
