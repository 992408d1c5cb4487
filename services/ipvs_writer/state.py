"""The writer's desired state and its state file.

The desired state is a map ``service id -> ServiceRecord``; records are immutable (a change makes a
new record), so a snapshot for rollback is a shallow copy of the map.

State file (JSON, so an operator can read it; path configurable, default
``/var/lib/gorb/state.json``)::

    {"version": 1,
     "services": {"web": {"options": ServiceOptions, "address": "10.0.0.1",
                          "backends": {"a": {"options": BackendOptions, "address": "10.1.0.1",
                                             "health": Health}}}}}

Writes are atomic: the new content goes to ``<file>.tmp``, is fsynced and renamed over the file.
Before that, the current file (last known good, since it was written by us and parsed at start)
is hard-linked to ``<file>.prev``, so at every instant ``<file>`` exists and ``<file>.prev`` holds
the state before the last write.

Loading: a missing file is a clean start (empty state). A file that does not parse raises
``StateFileError`` naming the file and the error, and saying whether a previous good copy exists;
the writer then refuses to start unless told ``--restore-previous``, which sets the corrupt file
aside as ``<file>.corrupt-<unix time>`` and loads ``<file>.prev``. It never starts empty silently.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec

from gorb.common.model import BackendOptions, ServiceOptions
from gorb.services.ipvs_writer.weights import Health

STATE_VERSION = 1


class BackendRecord(msgspec.Struct, frozen=True):
    options: BackendOptions
    address: str  # canonical IP literal of options.host
    health: Health = Health()  # pulse's verdict; kept so that a restart does not flap weights


class ServiceRecord(msgspec.Struct, frozen=True, dict=True):
    """``dict=True`` gives each record a private, never-serialised cache (see ``endpoints``)."""

    options: ServiceOptions
    address: str  # canonical VIP; "" for a fwmark service without host
    backends: dict[str, BackendRecord] = {}


def endpoints(record: ServiceRecord) -> frozenset[tuple[str, int]]:
    """The (address, port) of every backend of ``record``, computed once per record."""
    cached = record.__dict__.get("_endpoints")
    if cached is None:
        cached = frozenset((b.address, b.options.port) for b in record.backends.values())
        record.__dict__["_endpoints"] = cached
    return cached


class StateDocument(msgspec.Struct):
    version: int
    services: dict[str, ServiceRecord]


Services = dict[str, ServiceRecord]


class StateFileError(Exception):
    """The state file exists but cannot be used."""

    def __init__(self, path: Path, reason: str):
        self.path = path
        self.previous = previous_path(path) if previous_path(path).exists() else None
        hint = (f"; a previous good copy is at {self.previous}: start with --restore-previous to "
                "use it" if self.previous else "; no previous copy exists: fix or move the file")
        super().__init__(f"state file {path} is unusable: {reason}{hint}")


def previous_path(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def _decode(path: Path) -> Services:
    try:
        doc = msgspec.json.decode(path.read_bytes(), type=StateDocument)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise StateFileError(path, str(exc)) from None
    if doc.version != STATE_VERSION:
        raise StateFileError(path, f"unknown version {doc.version} (this gorb reads {STATE_VERSION})")
    return doc.services


def load(path: Path, restore_previous: bool = False) -> Services:
    """The desired state stored at ``path`` ({} if there is none)."""
    if not path.exists():
        return {}
    try:
        return _decode(path)
    except StateFileError as err:
        if not restore_previous or err.previous is None:
            raise
        services = _decode(err.previous)
        os.replace(path, path.with_name(f"{path.name}.corrupt-{int(time.time())}"))
        save(path, services)
        return services


def _encoded(record: ServiceRecord) -> bytes:
    """A service record's JSON, encoded once per record: records are never changed once saved
    (a change makes a new record), so a save encodes only the services changed since the last
    one — at 10,000 backends encoding them all took 8 ms of every write, one service 0.1 ms."""
    cached = record.__dict__.get("_json")
    if cached is None:
        cached = record.__dict__["_json"] = msgspec.json.encode(record)
    return cached


def encode(services: Services) -> bytes:
    """The state file's content: ``StateDocument(STATE_VERSION, services)`` as JSON."""
    parts = [b'{"version":%d,"services":{' % STATE_VERSION]
    for i, (vsid, record) in enumerate(services.items()):
        parts.append(b"%s%s:%s" % (b"," if i else b"", msgspec.json.encode(vsid),
                                   _encoded(record)))
    parts.append(b"}}")
    return b"".join(parts)


def save(path: Path, services: Services) -> None:
    """Atomically replace the state file, keeping the former one as ``<file>.prev``.

    The records in ``services`` must not change after this (the engine saves a batch's state
    once every request of it is staged)."""
    data = encode(services)
    tmp = path.with_name(path.name + ".tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    prev_tmp = path.with_name(path.name + ".prev.tmp")
    try:
        _link(path, prev_tmp)
        os.replace(prev_tmp, previous_path(path))
    except FileNotFoundError:
        pass  # the first save: nothing to keep
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _link(src: Path, dst: Path) -> None:
    """Hard-link ``src`` as ``dst``, replacing a ``dst`` left by a crash."""
    try:
        os.link(src, dst)
    except FileExistsError:
        dst.unlink()
        os.link(src, dst)
