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
from dataclasses import dataclass
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import msgspec

from gorb.common import errors, messages
from gorb.common.errors import GorbError
from gorb.common.pulse_messages import Outcome, TargetsChanged
from gorb.common.shard import owner
from gorb.services.ipvs_writer.desired import desired_table, held, ktable, ops_between
from gorb.services.ipvs_writer import metric_rows
from gorb.services.ipvs_writer.health import apply_results
from gorb.services.ipvs_writer.metric_rows import MetricRowsBuilder
from gorb.services.ipvs_writer.collector import Live, Snapshot
from gorb.services.ipvs_writer.reader import Snapshots
from gorb.services.ipvs_writer.staging import Draft, Staged, stage
from gorb.services.ipvs_writer.state import BackendRecord, ServiceRecord, Services
from gorb.services.ipvs_writer.table import KService, Op, SKey, kservice, plan
from gorb.services.ipvs_writer.targets import (
    Member,
    TargetGroup,
    backend_target,
    targets,
    update_targets,
)
from gorb.services.ipvs_writer.views import backend_view, service_summary, service_view
from gorb.services.ipvs_writer.weights import UNKNOWN, Health

# Re-exported: what the writer's tests and the discovery tests import from here.
__all__ = ["Draft", "Engine", "Staged", "desired_table", "held", "ktable", "ops_between",
           "service_view", "stage"]

log = logging.getLogger(__name__)



class KernelPort(Protocol):
    def apply(self, ops: list[Op]) -> list[Exception | None]: ...
    def dump(self) -> dict[SKey, KService]: ...
    def service(self, svc: KService) -> KService | None: ...
    def flush(self) -> None: ...


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
        # the shards (of pulse_workers) whose check targets changed since the last notice;
        # None: every shard
        self.changed_shards: set[int] | None = set()
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
        if self.changed_shards is not None:
            self.changed_shards = None if shards is None else self.changed_shards | shards

    def take_targets_changed(self) -> TargetsChanged | None:
        """The notice for the pulse workers of what changed since the last one, or None."""
        shards, self.changed_shards = self.changed_shards, set()
        if shards is None:
            return TargetsChanged()
        return TargetsChanged(self.pulse_workers, sorted(shards)) if shards else None

    # health -------------------------------------------------------------------------------------

    def targets(self) -> dict[str, TargetGroup]:
        if self._targets is None:
            self._targets = targets(self.services)
        return self._targets

    def handle_health(self, bodies: list[dict]) -> list[Event]:
        """Take pushed ``health.results``: update each backend's health and apply the weights
        that follow (``health.apply_results``). Results for unknown targets (a backend just
        deleted) are dropped."""
        draft = Draft(self.services)
        self.observed_version += 1
        touched, events = apply_results(draft, self.targets(), bodies, self.clock(),
                                        self.observed)
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

    def _snapshot(self, layout: tuple[int, Any] | None = None) -> Snapshot:
        """A snapshot at most a few intervals old (for ``layout``: with its columns following
        those rows); ``NotReady`` if the collector has none yet. Without a collector (tests over a
        fake kernel), one made here from a dump."""
        if self.snapshots is None:
            return Snapshot.of(self.kernel.dump(), time.monotonic(), layout)
        snap = self.snapshots.usable()
        if snap is not None and layout is not None and snap.generation != layout[0]:
            self.snapshots.describe(*layout)  # the collector answers with these rows at once
            snap = None
        if snap is None:
            raise NotReady
        return snap

    def _live_service(self, at: Pinned, vsid: str, record: ServiceRecord) -> Live | None:
        """One service's kernel entry, from a dump taken after its last commit as of ``at``
        (so a read after a write shows the kernel as the write left it); ``NotReady`` until
        there is one."""
        key = kservice(record.options, record.address)
        if self.snapshots is None:
            live = self.kernel.service(key)
            return None if live is None else Live.of(live)
        found, live = self.snapshots.entry(key.key, at.committed_at.get(vsid, float("-inf")))
        if not found:
            raise NotReady
        return live

    def read(self, type_: str, body: dict, pinned: Pinned | None = None) -> dict | Pinned:
        """The reply to a read of the state now (or of ``pinned``, an earlier state); a
        ``Pinned`` state instead when the read needs a newer snapshot of the kernel than there
        is: the loop asks again, of that state, when one arrives."""
        at = pinned or Pinned(self.services, self.committed_at)
        try:
            req = messages.decode_request(type_, body)
            if type_ == "service.list":
                return messages.ok({"services": sorted(at.services)})
            if type_ == "pulse.targets":
                if not 0 <= req.worker < req.workers:
                    raise errors.invalid("worker must be in [0, workers)")
                self.pulse_workers = req.workers
                return messages.ok({"targets": self.pulse_targets(req.worker, req.workers)})
            if type_ == "metrics.rows":
                layout = self.metric_rows.layout(at.services)
                rows = self.metric_rows.rows(at.services, self._snapshot(layout),
                                             self.observed, self.observed_version,
                                             req.generation)
                # shallow: the columns are already plain lists (to_builtins would copy them)
                return {**messages.ok(), "data": metric_rows.wire(rows)}
            if type_ == "state.dump":
                live = self._snapshot().services if req.stats else {}
                return messages.ok({"services": {
                    v: service_view(v, r, live.get(kservice(r.options, r.address).key),
                                    self.observed)
                    for v, r in at.services.items()}})
            return self._read_one(at, type_, req)
        except NotReady:
            return at if pinned else Pinned(at.services, dict(at.committed_at))
        except GorbError as err:
            return messages.fail(err)

    def _read_one(self, at: Pinned, type_: str, req: Any) -> dict:
        record = at.services.get(req.service)
        if record is None:
            raise GorbError(errors.NOT_FOUND)
        if type_ == "service.get" and req.summary and self.snapshots is not None:
            # the service's counters only: the last snapshot, however recent the last write
            live = self._snapshot().services.get(kservice(record.options, record.address).key)
            return messages.ok(service_summary(req.service, record, live, self.observed))
        live = self._live_service(at, req.service, record)
        if type_ == "service.get" and req.summary:
            return messages.ok(service_summary(req.service, record, live, self.observed))
        if type_ == "service.get":
            return messages.ok(service_view(req.service, record, live, self.observed))
        backend = record.backends.get(req.backend)
        if backend is None:
            raise GorbError(errors.NOT_FOUND)
        return messages.ok(backend_view(req.service, req.backend, backend, record, live,
                                        self.observed.get((req.service, req.backend))))


@dataclass(frozen=True)
class Pinned:
    """The desired state a read is answered of: the service map (immutable records) and each
    service's last commit time then."""
    services: Services
    committed_at: dict[str, float]


class NotReady(Exception):
    """A read needs a newer snapshot of the kernel than the collector has sent yet."""


def _kernel_error(exc: Exception) -> GorbError:
    err = getattr(exc, "errno", None)
    if err == errno_mod.EEXIST:
        return GorbError(errors.EXISTS, f"{errors.MSG_EXISTS}: the kernel already has it ({exc})")
    return GorbError(errors.KERNEL, f"{errors.MSG_IPVS}: {exc}")
