"""The envelope every message on gorb's bus travels in, and its msgpack encoding.

Wire shape (one msgpack map, exactly these five keys)::

    {"v": 1, "type": "service.create", "id": "1a2b-3f", "src": "api", "body": {...}}

- ``v``: protocol version, an int; only ``PROTOCOL_VERSION`` is understood.
- ``type``: ``family.verb``; a reply is the request type plus ``.reply`` (``service.create.reply``).
- ``id``: chosen by the sender of a request; the reply carries the same id.
- ``src``: name of the sending process (``api``, ``pulse-worker``, ...), for logs.
- ``body``: a map whose shape is owned by the message family's module.

This module checks the envelope only. It does not know which types exist: the registry of message
families lives elsewhere and may pass its names as ``known_types`` to reject the rest here.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Container
from dataclasses import dataclass
from typing import Any

import msgpack
import msgspec

PROTOCOL_VERSION = 1

_KEYS = frozenset({"v", "type", "id", "src", "body"})

_counter = itertools.count(1)


class EnvelopeError(ValueError):
    """Bytes that are not a valid envelope; the message says what was wrong."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """One bus message; see the module docstring for the wire shape."""

    v: int
    type: str
    id: str
    src: str
    body: dict[Any, Any]

    @classmethod
    def new(cls, type: str, body: dict[Any, Any], src: str, id: str | None = None) -> Envelope:
        """An envelope of the current protocol version with a fresh id unless one is given."""
        return cls(PROTOCOL_VERSION, type, new_id() if id is None else id, src, body)


def new_id() -> str:
    """A short id unique among the ids this process hands out while the peers that saw them live.

    The pid keeps ids from two processes apart; the counter keeps one process's ids apart.
    """
    return f"{os.getpid():x}-{next(_counter):x}"


_encode = msgspec.msgpack.Encoder().encode


def encode(env: Envelope) -> bytes:
    """The msgpack bytes of ``env`` (str as msgpack str, bytes as msgpack bin; a
    ``msgspec.Raw`` in the body is msgpack already and goes in as it is: the writer's
    ``/metrics`` columns, encoded by its statistics collector)."""
    return _encode({"v": env.v, "type": env.type, "id": env.id, "src": env.src,
                    "body": env.body})


def decode(data: bytes, known_types: Container[str] | None = None) -> Envelope:
    """The envelope in ``data``; raises ``EnvelopeError`` saying why if it is not a valid one.

    Extra keys are rejected too: a sender that needs more fields must bump ``v``.
    """
    try:
        # strict_map_key=False so bodies keyed by ints (ports, weights) decode as they encoded.
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise EnvelopeError(f"not msgpack: {exc}") from exc
    if not isinstance(obj, dict):
        raise EnvelopeError(f"not a map: {type(obj).__name__}")
    missing = _KEYS - obj.keys()
    if missing:
        raise EnvelopeError(f"missing keys: {sorted(missing)}")
    extra = obj.keys() - _KEYS
    if extra:
        raise EnvelopeError(f"unexpected keys: {sorted(map(repr, extra))}")
    v = obj["v"]
    # bool is an int subclass; True must not pass for version 1.
    if not isinstance(v, int) or isinstance(v, bool):
        raise EnvelopeError(f"v must be an int, got {type(v).__name__}")
    if v != PROTOCOL_VERSION:
        raise EnvelopeError(f"unknown protocol version v={v} (known: {PROTOCOL_VERSION})")
    for key in ("type", "id", "src"):
        value = obj[key]
        if not isinstance(value, str) or not value:
            raise EnvelopeError(f"{key} must be a non-empty str, got {value!r}")
    if not isinstance(obj["body"], dict):
        raise EnvelopeError(f"body must be a map, got {type(obj['body']).__name__}")
    if known_types is not None and obj["type"] not in known_types:
        raise EnvelopeError(f"unknown message type {obj['type']!r}")
    return Envelope(v, obj["type"], obj["id"], obj["src"], obj["body"])
