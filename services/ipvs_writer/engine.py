"""The writer's engine: owns the desired state, turns requests into state changes and kernel ops.

``stage`` is pure: (services, request) -> new services + what changed, or a GorbError.
``Engine`` drives it against two injected edges, a kernel (``apply(ops)``, ``dump()``,
``service(svc)``, ``flush()``) and ``persist(services)``; it has no sockets and no clock.

Mutations come in batches (group commit). For a batch: stage every request in order, persist the
staged state (write-ahead: a crash after this converges the kernel to it on restart), apply the ops
of ``plan(new, old)`` for the touched services in one netlink batch, and commit. If any op fails,
the kernel is restored for the touched services to the state before the batch (from a fresh dump,
deleting only what this batch itself added), and the requests are replayed one at a time, so each
gets its own exact answer. The kernel is assumed to equal the desired state between batches; drift
(a hand edit) is found by ``reconcile`` (dump, plan, apply: the same path), or by a failed op.
"""

from __future__ import annotations

import errno as errno_mod
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from common import errors, messages
from common.errors import GorbError
from common.model import ServiceOptions
from common.validation import (
    canonical_ip,
    decode,
    ip_family,
    validate_backend,
    validate_object_id,
    validate_service,
    validate_weight,
)
from services.ipvs_writer.state import BackendRecord, ServiceRecord, Services, endpoints
from services.ipvs_writer.table import KService, Op, SKey, kdest, kservice, plan

log = logging.getLogger(__name__)

# The fields that make up a service's kernel key: PATCH may not change them.
KEY_FIELDS = ("host", "port", "protocol", "fwmark", "family")


class KernelPort(Protocol):
    def apply(self, ops: list[Op]) -> list[Exception | None]: ...
    def dump(self) -> dict[SKey, KService]: ...
    def service(self, svc: KService) -> KService | None: ...
    def flush(self) -> None: ...


# --- pure core ----------------------------------------------------------------------------------

def ktable(record: ServiceRecord) -> KService:
    """The kernel service (with dests) a service record asks for."""
    svc = kservice(record.options, record.address)
    for b in record.backends.values():
        d = kdest(b.options, b.address, b.options.weight, svc.af)
        svc.dests[d.key] = d
    return svc


def desired_table(services: Services) -> dict[SKey, KService]:
    return {t.key: t for t in map(ktable, services.values())}


@dataclass
class Staged:
    touched: str  # the service id whose kernel entries may change
    events: list[tuple[str, str, dict]] = field(default_factory=list)  # (topic, type, body)


class Draft:
    """A batch's working copy of the desired state, copied on write.

    The service map is copied once per draft, and a service's backend map (with its endpoint
    index) once per draft on its first change, so a batch of n backend changes costs O(n), not
    O(n x backends). The records of ``base`` are never mutated: a service changed in the draft
    gets a new record whose backend map belongs to the draft until it is committed.
    """

    def __init__(self, base: Services):
        self.services: Services = dict(base)
        self._fresh: set[str] = set()

    def put(self, vsid: str, record: ServiceRecord) -> None:
        old = self.services.get(vsid)
        if vsid in self._fresh and old is not None and record.backends is old.backends:
            record.__dict__["_endpoints"] = old.__dict__["_endpoints"]  # still the draft's own
        else:
            self._fresh.discard(vsid)
        self.services[vsid] = record

    def remove(self, vsid: str) -> None:
        del self.services[vsid]
        self._fresh.discard(vsid)

    def writable(self, vsid: str) -> ServiceRecord:
        """The draft's own record for ``vsid``: its backend map may be changed in place."""
        record = self.services[vsid]
        if vsid not in self._fresh:
            fresh = msgspec.structs.replace(record, backends=dict(record.backends))
            fresh.__dict__["_endpoints"] = set(endpoints(record))
            self.services[vsid] = record = fresh
            self._fresh.add(vsid)
        return record


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


def service_view(vsid: str, record: ServiceRecord, live: KService | None = None) -> dict:
    return {
        "service": vsid,
        "options": msgspec.to_builtins(record.options),
        "address": record.address,
        "backends": {rs: backend_view(vsid, rs, b, record, live) for rs, b in record.backends.items()},
        "kernel": _kservice_view(live),
    }


def backend_view(vsid: str, rsid: str, b: BackendRecord, record: ServiceRecord,
                 live: KService | None = None) -> dict:
    kd = None
    if live is not None:
        kd = live.dests.get((b.address, b.options.port))
    return {
        "service": vsid,
        "backend": rsid,
        "options": msgspec.to_builtins(b.options),
        "address": b.address,
        "kernel": None if kd is None else {"weight": kd.weight, "fwd": kd.fwd, "stats": kd.stats},
    }


def _kservice_view(live: KService | None) -> dict | None:
    if live is None:
        return None
    return {"scheduler": live.sched, "flags": live.flags, "timeout": live.timeout,
            "netmask": live.netmask, "stats": live.stats}


def stage(draft: Draft, type_: str, req: Any, default_address: str = "") -> Staged:
    """Apply one mutation to ``draft``; raises GorbError (and leaves the draft as it was) for a
    refused request. ``default_address`` is the VIP of a service created without ``host``
    (GORB: the first address of the ``-i`` device)."""
    services = draft.services
    vsid = validate_object_id(req.service)
    current = services.get(vsid)
    if type_ == "service.create":
        address = req.address
        if not req.options.host and not address and not req.options.fwmark:
            address = default_address
        opts = validate_service(req.options, address)  # GORB: a bad body is 400 before any 409
        if current is not None:
            raise GorbError(errors.EXISTS)
        record = ServiceRecord(opts, _address(opts.host, address))
        if not opts.fwmark and not record.address:
            raise errors.invalid(errors.MSG_ENDPOINT_MISSING)
        other = _key_conflict(services, vsid, kservice(opts, record.address).key)
        if other is not None:
            raise GorbError(errors.EXISTS, f"{errors.MSG_EXISTS}: service {other!r} has that address")
        draft.put(vsid, record)
        return Staged(vsid, [(f"service.{vsid}.created", "service.created",
                                   service_view(vsid, record))])
    if current is None:
        raise GorbError(errors.NOT_FOUND)
    if type_ == "service.update":
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
        draft.put(vsid, record)
        return Staged(vsid, [(f"service.{vsid}.updated", "service.updated",
                                   service_view(vsid, record))])
    if type_ == "service.delete":
        draft.remove(vsid)
        return Staged(vsid, [(f"service.{vsid}.deleted", "service.deleted",
                                   {"service": vsid})])
    rsid = validate_object_id(req.backend)
    backend = current.backends.get(rsid)
    if type_ == "backend.create":
        opts = validate_backend(req.options, req.address, _service_family(current),
                                fwmark_service=bool(current.options.fwmark))
        if backend is not None:
            raise GorbError(errors.EXISTS)
        address = _address(opts.host, req.address)
        if (address, opts.port) in endpoints(current):
            other = next(i for i, o in current.backends.items()
                         if (o.address, o.options.port) == (address, opts.port))
            raise GorbError(errors.EXISTS, f"{errors.MSG_EXISTS}: backend {other!r} has "
                                           "that address and port")
        b = BackendRecord(opts, address)
        topic, verb = f"backend.{vsid}.{rsid}.created", "backend.created"
    elif backend is None:
        raise GorbError(errors.NOT_FOUND)
    elif type_ == "backend.update":
        b = msgspec.structs.replace(backend, options=msgspec.structs.replace(
            backend.options, weight=validate_weight(req.weight)))
        topic, verb = f"backend.{vsid}.{rsid}.updated", "backend.updated"
    else:  # backend.delete
        record = draft.writable(vsid)
        del record.backends[rsid]
        record.__dict__["_endpoints"].discard((backend.address, backend.options.port))
        return Staged(vsid, [(f"backend.{vsid}.{rsid}.deleted", "backend.deleted",
                                   {"service": vsid, "backend": rsid})])
    record = draft.writable(vsid)
    record.backends[rsid] = b
    record.__dict__["_endpoints"].add((b.address, b.options.port))
    return Staged(vsid, [(topic, verb, backend_view(vsid, rsid, b, record))])


def ops_between(old: Services, new: Services, vsids: set[str]) -> list[Op]:
    """Kernel ops taking the touched services from ``old`` to ``new`` (kernel assumed == old)."""
    want = {t.key: t for t in (ktable(new[v]) for v in vsids if v in new)}
    have = {t.key: t for t in (ktable(old[v]) for v in vsids if v in old)}
    return plan(want, have, owned=set(have) - set(want))


# --- the engine ---------------------------------------------------------------------------------

Event = tuple[str, str, dict]


class Engine:
    def __init__(self, services: Services, kernel: KernelPort,
                 persist: Callable[[Services], None],
                 default_address: Callable[[], str] = lambda: ""):
        self.services = services
        self.kernel = kernel
        self.persist = persist
        self.default_address = default_address
        self.foreign = 0  # kernel services gorb does not own, as of the last converge

    # start and reconcile ------------------------------------------------------------------------

    def converge(self) -> tuple[int, list[str]]:
        """Dump, plan, apply: adopt what matches, repair what differs. Returns (ops, errors)."""
        desired = desired_table(self.services)
        actual = self.kernel.dump()
        self.foreign = len(set(actual) - set(desired))
        ops = plan(desired, actual)
        results = self.kernel.apply(ops) if ops else []
        failures = [str(r) for r in results if r is not None]
        for f in failures:
            log.error("reconcile: %s", f)
        return len(ops), failures

    def start(self, flush: bool = False) -> tuple[int, list[str]]:
        if flush:
            log.warning("flushing every IPVS service of this namespace (--flush)")
            self.kernel.flush()
        return self.converge()

    # mutations ----------------------------------------------------------------------------------

    def handle_batch(self, requests: list[tuple[str, dict]]) -> list[tuple[dict, list[Event]]]:
        """Answer a run of mutation requests; one (reply, events) per request, in order."""
        before = self.services
        draft = Draft(before)
        staged: list[Staged | GorbError] = []
        for type_, body in requests:
            try:
                staged.append(stage(draft, type_, messages.decode_request(type_, body),
                                    self._default_for(type_, body)))
            except GorbError as err:
                staged.append(err)
        services = draft.services
        touched = {s.touched for s in staged if isinstance(s, Staged)}
        if not touched:
            return [(messages.fail(s), []) for s in staged]
        t0 = time.perf_counter()
        self.persist(services)
        t1 = time.perf_counter()
        ops = ops_between(before, services, touched)
        results = self.kernel.apply(ops)
        log.debug("batch of %d: persist %.1f ms, plan+apply %d ops %.1f ms", len(requests),
                  (t1 - t0) * 1e3, len(ops), (time.perf_counter() - t1) * 1e3)
        if all(r is None for r in results):
            self.services = services
            return [(messages.fail(s), []) if isinstance(s, GorbError) else
                    (messages.ok(), s.events) for s in staged]
        self._restore(before, touched, ops, results)
        self.services = before
        out = [self._one(type_, body) for type_, body in requests]
        self.persist(self.services)
        return out

    def _one(self, type_: str, body: dict) -> tuple[dict, list[Event]]:
        before = self.services
        draft = Draft(before)
        try:
            st = stage(draft, type_, messages.decode_request(type_, body),
                       self._default_for(type_, body))
        except GorbError as err:
            return messages.fail(err), []
        ops = ops_between(before, draft.services, {st.touched})
        results = self.kernel.apply(ops)
        failed = [r for r in results if r is not None]
        if not failed:
            self.services = draft.services
            return messages.ok(), st.events
        self._restore(before, {st.touched}, ops, results)
        return messages.fail(_kernel_error(failed[0])), []

    def _default_for(self, type_: str, body: Any) -> str:
        """The default VIP, looked up only for a service created without host or address."""
        if type_ != "service.create" or not isinstance(body, dict):
            return ""
        opts = body.get("options")
        if isinstance(opts, dict) and (opts.get("host") or opts.get("fwmark")) or body.get("address"):
            return ""
        return self.default_address()

    def _restore(self, services: Services, touched: set[str], ops: list[Op],
                 results: list[Exception | None]) -> None:
        """Put the touched services back as ``services`` has them after a partly failed apply."""
        added = {op.service.key for op, r in zip(ops, results)
                 if op.verb == "add_service" and r is None}
        want = {t.key: t for t in (ktable(services[v]) for v in touched if v in services)}
        actual = self.kernel.dump()
        scope = set(want) | added
        fix = plan(want, {k: v for k, v in actual.items() if k in scope}, owned=added - set(want))
        # A dest added under a key outside the scope went into a service this batch neither owns
        # nor created (its add_service failed with EEXIST: a foreign service): take it back out.
        fix += [Op("del_dest", op.service, op.dest) for op, r in zip(ops, results)
                if op.verb == "add_dest" and r is None and op.service.key not in scope]
        for r in self.kernel.apply(fix):
            if r is not None:
                log.error("restore after a failed batch: %s", r)

    # reads --------------------------------------------------------------------------------------

    def read(self, type_: str, body: dict) -> dict:
        try:
            req = messages.decode_request(type_, body)
            if type_ == "service.list":
                return messages.ok({"services": sorted(self.services)})
            if type_ == "state.dump":
                live = self.kernel.dump() if req.stats else {}
                return messages.ok({"services": {
                    v: service_view(v, r, live.get(kservice(r.options, r.address).key))
                    for v, r in self.services.items()}})
            record = self.services.get(req.service)
            if record is None:
                raise GorbError(errors.NOT_FOUND)
            live = self.kernel.service(kservice(record.options, record.address))
            if type_ == "service.get":
                return messages.ok(service_view(req.service, record, live))
            backend = record.backends.get(req.backend)
            if backend is None:
                raise GorbError(errors.NOT_FOUND)
            return messages.ok(backend_view(req.service, req.backend, backend, record, live))
        except GorbError as err:
            return messages.fail(err)


def _kernel_error(exc: Exception) -> GorbError:
    err = getattr(exc, "errno", None)
    if err == errno_mod.EEXIST:
        return GorbError(errors.EXISTS, f"{errors.MSG_EXISTS}: the kernel already has it ({exc})")
    return GorbError(errors.KERNEL, f"{errors.MSG_IPVS}: {exc}")
