"""Staging (pure): one mutation request applied to a batch's draft of the desired state.

``stage(draft, type, request)`` looks the request type up in ``HANDLERS``, one function per
message type (the body each takes is its typed ``gorb.common.messages`` struct, shown in its
docstring); a handler validates, changes the draft and returns what changed (``Staged``), or
raises a GorbError and leaves the draft as it was. No sockets, no clock: the engine batches,
persists and applies (``engine.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from gorb.common import errors
from gorb.common.errors import GorbError
from gorb.common.model import KEY_FIELDS, ServiceOptions
from gorb.common.validation import (
    canonical_ip,
    check_pulse,
    decode,
    ip_family,
    validate_backend,
    validate_object_id,
    validate_service,
    validate_weight,
)
from gorb.services.ipvs_writer.state import BackendRecord, ServiceRecord, Services, endpoints
from gorb.services.ipvs_writer.table import SKey, kservice
from gorb.services.ipvs_writer.targets import effective_pulse
from gorb.services.ipvs_writer.views import backend_view, service_view
from gorb.services.ipvs_writer.weights import Health

Change = dict[str, dict[str, Any]]  # "/service/<vs>[/<rs>]" -> {"before": ..., "after": ...}
Endpoint = tuple[str, int]  # a backend's (address, port)
Seed = Callable[[ServiceRecord, BackendRecord], Health]


@dataclass
class Staged:
    touched: str  # the service id whose kernel entries may change
    events: list[tuple[str, str, dict]] = field(default_factory=list)  # (topic, type, body)
    change: Change = field(default_factory=dict)  # what the request changed, for the reply


def _service_state(record: ServiceRecord) -> dict:
    """A service as a mutation reply's ``change`` shows it: what was asked for and where; its
    backends are entries of their own (``_backend_state``), health is not a change."""
    return {"options": msgspec.to_builtins(record.options), "address": record.address}


def _backend_state(b: BackendRecord) -> dict:
    return {"options": msgspec.to_builtins(b.options), "address": b.address}


def _change(path: str, before: dict | None, after: dict | None) -> Change:
    return {path: {"before": before, "after": after}}


class Draft:
    """A batch's working copy of the desired state, copied on write.

    The service map is copied once per draft, and a service's backend map (with its endpoint
    index, ``endpoints``) once per draft on its first change, so a batch of n backend changes
    costs O(n), not O(n x backends). The records of ``base`` are never mutated: a service
    changed in the draft gets a new record whose backend map belongs to the draft until it is
    committed. The draft's endpoint index is its own field; a committed record's is computed
    (once) by ``state.endpoints``.
    """

    def __init__(self, base: Services):
        self.services: Services = dict(base)
        self._fresh: dict[str, set[Endpoint]] = {}  # vsid -> the draft's own endpoint index

    def endpoints(self, vsid: str) -> frozenset[Endpoint] | set[Endpoint]:
        """The (address, port) of every backend of service ``vsid`` in the draft."""
        own = self._fresh.get(vsid)
        return own if own is not None else endpoints(self.services[vsid])

    def put(self, vsid: str, record: ServiceRecord) -> None:
        old = self.services.get(vsid)
        if not (vsid in self._fresh and old is not None and record.backends is old.backends):
            self._fresh.pop(vsid, None)  # a record with other backends: its own index
        self.services[vsid] = record

    def remove(self, vsid: str) -> None:
        del self.services[vsid]
        self._fresh.pop(vsid, None)

    def writable(self, vsid: str) -> ServiceRecord:
        """The draft's own record for ``vsid``: its backend map may be changed in place
        (through ``set_backend`` / ``del_backend``, which keep the index)."""
        record = self.services[vsid]
        if vsid not in self._fresh:
            index = set(endpoints(record))
            record = msgspec.structs.replace(record, backends=dict(record.backends))
            self.services[vsid] = record
            self._fresh[vsid] = index
        return record

    def set_backend(self, vsid: str, rsid: str, b: BackendRecord) -> ServiceRecord:
        record = self.writable(vsid)
        old = record.backends.get(rsid)
        if old is not None:
            self._fresh[vsid].discard((old.address, old.options.port))
        record.backends[rsid] = b
        self._fresh[vsid].add((b.address, b.options.port))
        return record

    def del_backend(self, vsid: str, rsid: str) -> None:
        record = self.writable(vsid)
        b = record.backends.pop(rsid)
        self._fresh[vsid].discard((b.address, b.options.port))


def _service_family(record: ServiceRecord) -> str:
    if record.options.family:
        return record.options.family
    return ip_family(record.address) if record.address else "ipv4"


def _address(host: str, address: str) -> str:
    ip = address or host
    if not ip:
        return ""
    try:
        return canonical_ip(ip)
    except GorbError:
        raise errors.invalid(f"host {host!r} is not an IP address and was not resolved") from None


def _key_conflict(services: Services, vsid: str, key: SKey) -> str | None:
    for other_id, other in services.items():
        if other_id != vsid and kservice(other.options, other.address).key == key:
            return other_id
    return None


@dataclass(frozen=True)
class Context:
    """What a handler may need besides the draft and the request."""

    default_address: str = ""  # the VIP of a service created without host (GORB's -i device)
    seed: Seed | None = None  # the health a new backend starts with (a known target's)


def _service_create(draft: Draft, vsid: str, req: Any, ctx: Context) -> Staged:
    """``service.create`` {service, options: ServiceOptions, address?}: 409 if it exists or
    another service has its kernel key."""
    address = req.address
    if not req.options.host and not address and not req.options.fwmark:
        address = ctx.default_address
    opts = validate_service(req.options, address)  # GORB: a bad body is 400 before any 409
    if vsid in draft.services:
        raise GorbError(errors.EXISTS)
    record = ServiceRecord(opts, _address(opts.host, address))
    if not opts.fwmark and not record.address:
        raise errors.invalid(errors.MSG_ENDPOINT_MISSING)
    other = _key_conflict(draft.services, vsid, kservice(opts, record.address).key)
    if other is not None:
        raise GorbError(errors.EXISTS, f"{errors.MSG_EXISTS}: service {other!r} has that address")
    draft.put(vsid, record)
    return Staged(vsid, [(f"service.{vsid}.created", "service.created",
                          service_view(vsid, record))],
                  _change(f"/service/{vsid}", None, _service_state(record)))


def _service_update(draft: Draft, vsid: str, req: Any, ctx: Context) -> Staged:
    """``service.update`` {service, options: {field: value}}: a PATCH of the options; the
    kernel key (KEY_FIELDS) may not change."""
    current = draft.services[vsid]
    merged = msgspec.structs.asdict(current.options)
    unknown = set(req.options) - set(merged)
    if unknown:
        raise errors.invalid(f"unknown option(s): {', '.join(sorted(unknown))}")
    merged.update(req.options)
    if not merged["persistent"]:
        # The stored timeout is the one validation defaulted when persistence was on; turning
        # persistence off drops it (and the netmask) unless the request itself sets them.
        for k in ("timeout", "netmask"):
            if k not in req.options:
                merged[k] = None if k == "netmask" else 0
    opts = validate_service(decode(merged, ServiceOptions), current.address)
    changed = [k for k in KEY_FIELDS if getattr(opts, k) != getattr(current.options, k)]
    if changed:
        raise errors.invalid(f"the service key ({', '.join(KEY_FIELDS[:4])}) cannot be changed "
                             f"in place ({', '.join(changed)} differs): delete and re-create it")
    record = msgspec.structs.replace(current, options=opts)
    for b in record.backends.values():
        check_pulse(effective_pulse(record, b))
    draft.put(vsid, record)
    return Staged(vsid, [(f"service.{vsid}.updated", "service.updated",
                          service_view(vsid, record))],
                  _change(f"/service/{vsid}", _service_state(current), _service_state(record)))


def _service_delete(draft: Draft, vsid: str, req: Any, ctx: Context) -> Staged:
    """``service.delete`` {service}: with all its backends."""
    current = draft.services[vsid]
    draft.remove(vsid)
    change = _change(f"/service/{vsid}", _service_state(current), None)
    for rs, b in current.backends.items():  # they go with it
        change.update(_change(f"/service/{vsid}/{rs}", _backend_state(b), None))
    return Staged(vsid, [(f"service.{vsid}.deleted", "service.deleted", {"service": vsid})],
                  change)


def _backend_staged(draft: Draft, vsid: str, rsid: str, b: BackendRecord,
                    before: BackendRecord | None, verb: str) -> Staged:
    record = draft.set_backend(vsid, rsid, b)
    return Staged(vsid, [(f"backend.{vsid}.{rsid}.{verb}", f"backend.{verb}",
                          backend_view(vsid, rsid, b, record))],
                  _change(f"/service/{vsid}/{rsid}",
                          None if before is None else _backend_state(before), _backend_state(b)))


def _backend_create(draft: Draft, vsid: str, req: Any, ctx: Context) -> Staged:
    """``backend.create`` {service, backend, options: BackendOptions, address?}: 409 if it
    exists or another backend of the service has its address and port."""
    current = draft.services[vsid]
    rsid = validate_object_id(req.backend)
    opts = validate_backend(req.options, req.address, _service_family(current),
                            fwmark_service=bool(current.options.fwmark))
    if rsid in current.backends:
        raise GorbError(errors.EXISTS)
    address = _address(opts.host, req.address)
    if (address, opts.port) in draft.endpoints(vsid):
        other = next(i for i, o in current.backends.items()
                     if (o.address, o.options.port) == (address, opts.port))
        raise GorbError(errors.EXISTS, f"{errors.MSG_EXISTS}: backend {other!r} has "
                                       "that address and port")
    b = BackendRecord(opts, address)
    check_pulse(effective_pulse(current, b))
    if ctx.seed is not None:  # a target already known (down) under another service: same verdict
        b = msgspec.structs.replace(b, health=ctx.seed(current, b))
    return _backend_staged(draft, vsid, rsid, b, None, "created")


def _backend_of(draft: Draft, vsid: str, req: Any) -> tuple[str, BackendRecord]:
    rsid = validate_object_id(req.backend)
    backend = draft.services[vsid].backends.get(rsid)
    if backend is None:
        raise GorbError(errors.NOT_FOUND)
    return rsid, backend


def _backend_update(draft: Draft, vsid: str, req: Any, ctx: Context) -> Staged:
    """``backend.update`` {service, backend, weight}: GORB's PATCH of a backend."""
    rsid, backend = _backend_of(draft, vsid, req)
    b = msgspec.structs.replace(backend, options=msgspec.structs.replace(
        backend.options, weight=validate_weight(req.weight)))
    return _backend_staged(draft, vsid, rsid, b, backend, "updated")


def _backend_delete(draft: Draft, vsid: str, req: Any, ctx: Context) -> Staged:
    """``backend.delete`` {service, backend}."""
    rsid, backend = _backend_of(draft, vsid, req)
    draft.del_backend(vsid, rsid)
    return Staged(vsid, [(f"backend.{vsid}.{rsid}.deleted", "backend.deleted",
                          {"service": vsid, "backend": rsid})],
                  _change(f"/service/{vsid}/{rsid}", _backend_state(backend), None))


Handler = Callable[[Draft, str, Any, Context], Staged]
HANDLERS: dict[str, Handler] = {
    "service.create": _service_create,
    "service.update": _service_update,
    "service.delete": _service_delete,
    "backend.create": _backend_create,
    "backend.update": _backend_update,
    "backend.delete": _backend_delete,
}


def stage(draft: Draft, type_: str, req: Any, default_address: str = "",
          seed: Seed | None = None) -> Staged:
    """Apply one mutation to ``draft``; raises GorbError (and leaves the draft as it was) for a
    refused request. ``default_address`` is the VIP of a service created without ``host``
    (GORB: the first address of the ``-i`` device)."""
    vsid = validate_object_id(req.service)
    if type_ != "service.create" and vsid not in draft.services:
        raise GorbError(errors.NOT_FOUND)
    return HANDLERS[type_](draft, vsid, req, Context(default_address, seed))
