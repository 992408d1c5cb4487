"""The writer's engine: owns the desired state, turns requests into state changes and kernel ops.

``stage`` is pure: (services, request) -> new services + what changed, or a GorbError.
``Engine`` drives it against two injected edges, a kernel (``apply(ops)``, ``dump()``,
``service(svc)``, ``flush()``) and ``persist(services)``; it has no sockets and no clock.

Mutations come in batches (group commit). For a batch: stage every request in order, persist the
staged state (write-ahead: a crash after this converges the kernel to it on restart; a state file
that cannot be written refuses the batch with errno ``state``, the kernel untouched), apply the ops
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
from collections.abc import Callable, Iterable
from functools import partial
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from gorb.common import errors, messages
from gorb.common.errors import GorbError
from gorb.common.model import ServiceOptions
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
from gorb.services.ipvs_writer import metric_rows
from gorb.services.ipvs_writer.metric_rows import MetricRowsBuilder
from gorb.services.ipvs_writer.reader import Snapshots
from gorb.services.ipvs_writer.state import BackendRecord, ServiceRecord, Services, endpoints
from gorb.common.pulse_messages import HealthResults, Outcome, TargetsChanged
from gorb.common.shard import owner
from gorb.services.ipvs_writer.table import KService, Op, SKey, kdest, kservice, plan
from gorb.services.ipvs_writer.targets import (
    Member,
    TargetGroup,
    backend_target,
    effective_pulse,
    slow_start,
    targets,
    update_targets,
)
from gorb.services.ipvs_writer.weights import (
    UNKNOWN,
    UP,
    Health,
    SlowStart,
    held_in,
    transition,
    weight,
)

log = logging.getLogger(__name__)

# The fields that make up a service's kernel key: PATCH may not change them.
KEY_FIELDS = ("host", "port", "protocol", "fwmark", "family")


class KernelPort(Protocol):
    def apply(self, ops: list[Op]) -> list[Exception | None]: ...
    def dump(self) -> dict[SKey, KService]: ...
    def service(self, svc: KService) -> KService | None: ...
    def flush(self) -> None: ...


# --- pure core ----------------------------------------------------------------------------------

def held(record: ServiceRecord) -> set[str]:
    """Backends of the service kept in by fail-open although pulse says they are down."""
    if record.options.fail_open <= 0:
        return set()
    return held_in([(rs, b.options.weight, b.health) for rs, b in record.backends.items()],
                   record.options.fail_open)


def ktable(record: ServiceRecord, rsids: Iterable[str] | None = None) -> KService:
    """The kernel service (with dests) a service record asks for: each dest at the weight its
    configured weight and its health give (``weights``); only the backends ``rsids`` that it
    has, when given."""
    svc = kservice(record.options, record.address)
    keep = held(record)
    backends = record.backends
    for rs in backends if rsids is None else rsids:
        b = backends.get(rs)
        if b is None:
            continue
        d = kdest(b.options, b.address, weight(b.options.weight, b.health, rs in keep), svc.af)
        svc.dests[d.key] = d
    return svc


def desired_table(services: Services) -> dict[SKey, KService]:
    return {t.key: t for t in map(ktable, services.values())}


Change = dict[str, dict[str, Any]]  # "/service/<vs>[/<rs>]" -> {"before": ..., "after": ...}


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


def service_view(vsid: str, record: ServiceRecord, live: KService | None = None,
                 observed: dict | None = None) -> dict:
    observed = observed or {}
    return {
        "service": vsid,
        "options": msgspec.to_builtins(record.options),
        "address": record.address,
        "backends": {rs: backend_view(vsid, rs, b, record, live, observed.get((vsid, rs)))
                     for rs, b in record.backends.items()},
        "kernel": _kservice_view(live),
    }


def service_summary(vsid: str, record: ServiceRecord, live: KService | None,
                    observed: dict) -> dict:
    """``service_view`` with each backend cut to what GET /service/<vs> shows of it (its
    health): a service of 1,000 backends is 50 kB on the bus instead of 500."""
    backends = {}
    for rs, b in record.backends.items():
        seen = observed.get((vsid, rs))
        backends[rs] = {"health": {"status": b.health.status, "since": b.health.since},
                        "check": None if seen is None else {"health": seen.health}}
    return {"service": vsid, "options": msgspec.to_builtins(record.options),
            "address": record.address, "backends": backends, "kernel": _kservice_view(live)}


def backend_view(vsid: str, rsid: str, b: BackendRecord, record: ServiceRecord,
                 live: KService | None = None, observed: Outcome | None = None) -> dict:
    """A backend as the writer sees it: options as given, the effective pulse, the weight it
    should have (``weight``), pulse's verdict (``health``), the last check (``check``) and the
    kernel's live entry (``kernel``)."""
    kd = None
    if live is not None:
        kd = live.dests.get((b.address, b.options.port))
    return {
        **_backend_static(vsid, rsid, b, record),
        "check": None if observed is None else msgspec.to_builtins(observed),
        "kernel": None if kd is None else {"weight": kd.weight, "fwd": kd.fwd, "stats": kd.stats},
    }


def _backend_static(vsid: str, rsid: str, b: BackendRecord, record: ServiceRecord) -> dict:
    """The part of ``backend_view`` that the records alone give, kept with the service record
    (its private ``__dict__``) per backend record, so GET /service/<vs> of a large service
    does not convert every backend's options at each read. Not kept under fail-open, where a
    backend's weight and ``held_in`` depend on the others' health (and a draft may change the
    backend map of its own records in place)."""
    cache = None
    if record.options.fail_open <= 0:
        cache = record.__dict__.setdefault("_backend_views", {})
        hit = cache.get(rsid)
        if hit is not None and hit[0] is b:
            return hit[1]
    keep = rsid in held(record)
    static = {
        "service": vsid,
        "backend": rsid,
        "options": msgspec.to_builtins(b.options),
        "pulse": msgspec.to_builtins(effective_pulse(record, b)),
        "address": b.address,
        "weight": weight(b.options.weight, b.health, keep),
        "health": {**msgspec.to_builtins(b.health), "held_in": keep},
    }
    if cache is not None:
        cache[rsid] = (b, static)
    return static


def _kservice_view(live: KService | None) -> dict | None:
    if live is None:
        return None
    return {"scheduler": live.sched, "flags": live.flags, "timeout": live.timeout,
            "netmask": live.netmask, "stats": live.stats}


Seed = Callable[[ServiceRecord, BackendRecord], Health]


def stage(draft: Draft, type_: str, req: Any, default_address: str = "",
          seed: Seed | None = None) -> Staged:
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
                                   service_view(vsid, record))],
                      _change(f"/service/{vsid}", None, _service_state(record)))
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
        for b in record.backends.values():
            check_pulse(effective_pulse(record, b))
        draft.put(vsid, record)
        return Staged(vsid, [(f"service.{vsid}.updated", "service.updated",
                                   service_view(vsid, record))],
                      _change(f"/service/{vsid}", _service_state(current),
                              _service_state(record)))
    if type_ == "service.delete":
        draft.remove(vsid)
        change = _change(f"/service/{vsid}", _service_state(current), None)
        for rs, b in current.backends.items():  # they go with it
            change.update(_change(f"/service/{vsid}/{rs}", _backend_state(b), None))
        return Staged(vsid, [(f"service.{vsid}.deleted", "service.deleted",
                                   {"service": vsid})], change)
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
        check_pulse(effective_pulse(current, b))
        if seed is not None:  # a target already known (down) under another service: same verdict
            b = msgspec.structs.replace(b, health=seed(current, b))
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
                                   {"service": vsid, "backend": rsid})],
                      _change(f"/service/{vsid}/{rsid}", _backend_state(backend), None))
    record = draft.writable(vsid)
    record.backends[rsid] = b
    record.__dict__["_endpoints"].add((b.address, b.options.port))
    return Staged(vsid, [(topic, verb, backend_view(vsid, rsid, b, record))],
                  _change(f"/service/{vsid}/{rsid}",
                          None if backend is None else _backend_state(backend), _backend_state(b)))


def _changed_dests(was: ServiceRecord, now: ServiceRecord) -> tuple[KService, KService] | None:
    """The kernel tables of ``was`` and ``now`` restricted to the backends whose record changed,
    when nothing else can differ (same service options and address, no fail-open, which weighs a
    backend by the health of the others); None when the whole service must be compared."""
    if (was.options != now.options or was.address != now.address
            or was.options.fail_open > 0):
        return None
    changed = [rs for rs in was.backends.keys() | now.backends.keys()
               if was.backends.get(rs) is not now.backends.get(rs)]
    return ktable(was, changed), ktable(now, changed)


def ops_between(old: Services, new: Services, vsids: set[str]) -> list[Op]:
    """Kernel ops taking the touched services from ``old`` to ``new`` (kernel assumed == old).

    A service whose own options did not change is compared only on the backends whose records
    changed (records are immutable and a draft keeps the unchanged ones), so a weight change
    costs a lookup per backend of its service, not a kernel view of each."""
    want: dict[SKey, KService] = {}
    have: dict[SKey, KService] = {}
    for v in vsids:
        was, now = old.get(v), new.get(v)
        pair = _changed_dests(was, now) if was is not None and now is not None else None
        if pair is not None:
            h, w = pair
        else:
            h = ktable(was) if was is not None else None
            w = ktable(now) if now is not None else None
        if h is not None:
            have[h.key] = h
        if w is not None:
            want[w.key] = w
    return plan(want, have, owned=set(have) - set(want))


# --- the engine ---------------------------------------------------------------------------------

Event = tuple[str, str, dict]


class Engine:
    def __init__(self, services: Services, kernel: KernelPort,
                 persist: Callable[[Services], None],
                 default_address: Callable[[], str] = lambda: "",
                 clock: Callable[[], float] = time.time, snapshots: Snapshots | None = None):
        """``snapshots``: where reads take the kernel's statistics (``reader.py``); None: the
        kernel is asked at each read (tests over a fake kernel)."""
        self.services = services
        self.snapshots = snapshots
        self.committed_at: dict[str, float] = {}  # snapshots.clock() of each service's last
                                                  # change in the kernel
        self.kernel = kernel
        self.persist = persist
        self.default_address = default_address
        self.clock = clock
        self.foreign = 0  # kernel services gorb does not own, as of the last converge
        self.observed: dict[Member, Outcome] = {}  # the last check of each backend (memory only)
        self.observed_version = 0  # changes whenever ``observed`` does
        self.metric_rows = MetricRowsBuilder(held)
        self._targets: dict[str, TargetGroup] | None = None  # cache; None = to be rebuilt
        self.targets_changed = False  # set when a mutation changed check targets: see
        self.changed_shards: set[int] | None = set()  # their shards of pulse_workers; None: all
        self.pulse_workers = 0  # how the workers split the checks (their last pulse.targets)

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
                                    self._default_for(type_, body), self._seed))
            except GorbError as err:
                staged.append(err)
        services = draft.services
        touched = {s.touched for s in staged if isinstance(s, Staged)}
        if not touched:
            return [(messages.fail(s), []) for s in staged]
        t0 = time.perf_counter()
        unsaved = self._save(services)
        if unsaved is not None:  # write-ahead: the kernel was not touched, nothing changed
            log.error("%s: refused a batch of %d request(s)", unsaved.reason, len(requests))
            return [(messages.fail(s if isinstance(s, GorbError) else unsaved), [])
                    for s in staged]
        t1 = time.perf_counter()
        ops = ops_between(before, services, touched)
        results = self.kernel.apply(ops)
        log.debug("batch of %d: persist %.1f ms, plan+apply %d ops %.1f ms", len(requests),
                  (t1 - t0) * 1e3, len(ops), (time.perf_counter() - t1) * 1e3)
        if all(r is None for r in results):
            self._commit(services, touched)
            return [(messages.fail(s), []) if isinstance(s, GorbError) else
                    (messages.ok({"change": s.change}), s.events) for s in staged]
        self._restore(before, touched, ops, results)
        self.services = before
        out = [self._one(type_, body) for type_, body in requests]
        unsaved = self._save(self.services)
        if unsaved is not None:  # the replayed changes are applied; the next save keeps them
            log.error("%s after replaying a batch: the kernel and the writer have its changes, "
                      "a restart before the next successful save would lose them", unsaved.reason)
        return out

    def _save(self, services: Services) -> GorbError | None:
        """Persist ``services``; a file system that refuses (full, read-only, gone) is an error
        to answer, not a crash: the writer keeps serving and the next change tries again."""
        try:
            self.persist(services)
        except OSError as exc:
            return GorbError(errors.STATE, f"cannot save the desired state ({exc}); "
                                           "nothing was changed")
        return None

    def _one(self, type_: str, body: dict) -> tuple[dict, list[Event]]:
        before = self.services
        draft = Draft(before)
        try:
            st = stage(draft, type_, messages.decode_request(type_, body),
                       self._default_for(type_, body), self._seed)
        except GorbError as err:
            return messages.fail(err), []
        ops = ops_between(before, draft.services, {st.touched})
        results = self.kernel.apply(ops)
        failed = [r for r in results if r is not None]
        if not failed:
            self._commit(draft.services, {st.touched})
            return messages.ok({"change": st.change}), st.events
        self._restore(before, {st.touched}, ops, results)
        return messages.fail(_kernel_error(failed[0])), []

    def _commit(self, services: Services, touched: set[str]) -> None:
        before, self.services = self.services, services
        self._changed_in_kernel(touched)
        self._update_targets(before, services, touched)
        self._forget_observed(before, services, touched)

    def _changed_in_kernel(self, touched: Iterable[str]) -> None:
        if self.snapshots is None:
            return
        now = self.snapshots.clock()
        for vsid in touched:
            if vsid in self.services:
                self.committed_at[vsid] = now
            else:
                self.committed_at.pop(vsid, None)

    def _update_targets(self, before: Services, services: Services, touched: set[str]) -> None:
        if self._targets is None:
            self._note_targets_changed(None)  # not built yet: tell every worker
            return
        # only the touched services' targets can have moved
        changed = update_targets(self._targets, before, services, touched)
        if changed:
            self._note_targets_changed({owner(k, self.pulse_workers) for k in changed}
                                       if self.pulse_workers else None)

    def _forget_observed(self, before: Services, services: Services, touched: set[str]) -> None:
        for vsid in touched:  # a re-created backend must not show a stale check
            was, now = before.get(vsid), services.get(vsid)
            if was is None or (now is not None and now.backends is was.backends):
                continue
            for rsid in was.backends:
                if (now is None or rsid not in now.backends) and (vsid, rsid) in self.observed:
                    del self.observed[(vsid, rsid)]
                    self.observed_version += 1

    def _note_targets_changed(self, shards: set[int] | None) -> None:
        self.targets_changed = True
        if self.changed_shards is not None:
            self.changed_shards = None if shards is None else self.changed_shards | shards

    def take_targets_changed(self) -> TargetsChanged | None:
        """The notice for the pulse workers of what changed since the last one, or None."""
        if not self.targets_changed:
            return None
        shards, self.targets_changed, self.changed_shards = self.changed_shards, False, set()
        if shards is None:
            return TargetsChanged()
        return TargetsChanged(self.pulse_workers, sorted(shards))

    # health -------------------------------------------------------------------------------------

    def targets(self) -> dict[str, TargetGroup]:
        if self._targets is None:
            self._targets = targets(self.services)
        return self._targets

    def handle_health(self, bodies: list[dict]) -> list[Event]:
        """Take pushed ``health.results``: update each backend's health and apply the weights
        that follow. Results for unknown targets (a backend just deleted) are dropped."""
        now = self.clock()
        groups = self.targets()
        draft = Draft(self.services)
        touched: set[str] = set()
        events: list[Event] = []
        self.observed_version += 1
        for body in bodies:
            try:
                msg = msgspec.convert(body, HealthResults)
            except msgspec.ValidationError as exc:
                log.warning("dropping malformed health results: %s", exc)
                continue
            for outcome in msg.results:
                group = groups.get(outcome.key)
                if group is None:
                    continue
                for member in group.members:
                    self.observed[member] = outcome
                    vsid, rsid = member
                    record = draft.services.get(vsid)
                    backend = record.backends.get(rsid) if record else None
                    if backend is None:
                        continue
                    new = _health_after(backend.health, outcome, msg.full, now,
                                        partial(slow_start, record, backend))
                    if new == backend.health:
                        continue
                    if new.status != backend.health.status:
                        log.warning("backend [%s/%s] status: %s", vsid, rsid,
                                    new.status.capitalize())
                        events.append((f"backend.{vsid}.{rsid}.health", "backend.health",
                                       {"service": vsid, "backend": rsid, "status": new.status}))
                    record = draft.writable(vsid)
                    record.backends[rsid] = msgspec.structs.replace(backend, health=new)
                    touched.add(vsid)
        if not touched:
            return events
        before = self.services
        for vsid in touched:
            was, now_held = held(before[vsid]), held(draft.services[vsid])
            if now_held and now_held != was:
                log.warning("service %s: fail-open holds %d backend(s) in although down (%s); "
                            "threshold %.2f", vsid, len(now_held), ", ".join(sorted(now_held)),
                            draft.services[vsid].options.fail_open)
        unsaved = self._save(draft.services)
        if unsaved is not None:  # traffic first: a failed backend is drained all the same
            log.error("%s for health changes: applying them anyway; a restart before the next "
                      "successful save would start from the previous verdicts",
                      unsaved.reason.replace("; nothing was changed", ""))
        ops = ops_between(before, draft.services, touched)
        for r in self.kernel.apply(ops):
            if r is not None:
                log.error("applying health weights: %s (the next reconcile retries)", r)
        self.services = draft.services  # the targets are unchanged: only health moved
        self._changed_in_kernel(touched)
        return events

    def _seed(self, service: ServiceRecord, backend: BackendRecord) -> Health:
        """The health a new backend starts with: that of its target if pulse already knows it."""
        target = backend_target(service, backend)
        group = self.targets().get(target.key) if target is not None else None
        for vsid, rsid in group.members if group else ():
            known = self.services[vsid].backends[rsid].health
            if known.status != UNKNOWN:
                return known
        return backend.health

    def pulse_targets(self, worker: int, workers: int) -> list[dict]:
        """The check targets of one worker's shard, seeded with the writer's last verdict."""
        out = []
        for key, group in self.targets().items():
            if owner(key, workers) != worker:
                continue
            # A backend added to a known target has not heard a result yet (unknown): seed
            # with a member that has, or a restarted worker would forget a down target.
            healths = [self.services[v].backends[r].health for v, r in group.members]
            h = next((m for m in healths if m.status != UNKNOWN), healths[0])
            out.append(msgspec.to_builtins(
                msgspec.structs.replace(group.target, status=h.status, since=h.since)))
        return out

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

    def _live_table(self) -> dict[SKey, KService]:
        """The kernel's table with statistics: the reader's snapshot when it has a fresh one
        (``reader.py``), else a dump here (the first read after a quiet spell)."""
        table = self.snapshots.usable() if self.snapshots is not None else None
        return self.kernel.dump() if table is None else table

    def _live_service(self, vsid: str, record: ServiceRecord) -> KService | None:
        """One service's kernel entry: from a snapshot taken after its last commit (else the
        snapshot may not show the change yet, and the kernel is asked)."""
        key = kservice(record.options, record.address)
        if self.snapshots is not None:
            table = self.snapshots.usable(since=self.committed_at.get(vsid, float("-inf")))
            if table is not None:
                return table.get(key.key)
        return self.kernel.service(key)

    def read(self, type_: str, body: dict) -> dict:
        try:
            req = messages.decode_request(type_, body)
            if type_ == "service.list":
                return messages.ok({"services": sorted(self.services)})
            if type_ == "pulse.targets":
                if not 0 <= req.worker < req.workers:
                    raise errors.invalid("worker must be in [0, workers)")
                self.pulse_workers = req.workers
                return messages.ok({"targets": self.pulse_targets(req.worker, req.workers)})
            if type_ == "metrics.rows":
                rows = self.metric_rows.rows(self.services, self._live_table(), self.observed,
                                             self.observed_version, req.generation)
                # shallow: the columns are already plain lists (to_builtins would copy them)
                return {**messages.ok(), "data": metric_rows.wire(rows)}
            if type_ == "state.dump":
                live = self._live_table() if req.stats else {}
                return messages.ok({"services": {
                    v: service_view(v, r, live.get(kservice(r.options, r.address).key),
                                    self.observed)
                    for v, r in self.services.items()}})
            record = self.services.get(req.service)
            if record is None:
                raise GorbError(errors.NOT_FOUND)
            live = self._live_service(req.service, record)
            if type_ == "service.get":
                if req.summary:
                    return messages.ok(service_summary(req.service, record, live,
                                                       self.observed))
                return messages.ok(service_view(req.service, record, live, self.observed))
            backend = record.backends.get(req.backend)
            if backend is None:
                raise GorbError(errors.NOT_FOUND)
            return messages.ok(backend_view(req.service, req.backend, backend, record, live,
                                            self.observed.get((req.service, req.backend))))
        except GorbError as err:
            return messages.fail(err)


def _health_after(h: Health, outcome: Outcome, full: bool, now: float,
                  slow: Callable[[], SlowStart]) -> Health:
    """A backend's health after one reported outcome. A full resend only corrects the status
    (it repeats results already counted); a failed check of a target still up (``fall`` not
    reached) changes nothing; only a passed check advances a climb. ``slow`` (the backend's slow
    start, a lookup) is asked only when the health may move: not for nearly every result, a
    passed check of a backend already up at full weight."""
    if outcome.status == UNKNOWN:
        return h
    if full:
        return transition(h, outcome.status, now, slow()) if outcome.status != h.status else h
    if outcome.status == UP and (not outcome.ok or (h.status == UP and h.level >= 1.0)):
        return h
    return transition(h, outcome.status, now, slow())


def _kernel_error(exc: Exception) -> GorbError:
    err = getattr(exc, "errno", None)
    if err == errno_mod.EEXIST:
        return GorbError(errors.EXISTS, f"{errors.MSG_EXISTS}: the kernel already has it ({exc})")
    return GorbError(errors.KERNEL, f"{errors.MSG_IPVS}: {exc}")
