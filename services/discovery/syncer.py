"""The store sync loop: one greenlet that owns the sync's state (the last agreed ``base``) and runs
every round, whether started by a store change, a writer event, a timer or a control request.

A round: ``state.dump`` from the writer, a fresh read of the store, ``reconcile.plan``, then each
action's steps in order — writer commands over the bus (ordinary ``gorb.common.messages`` requests,
exactly what the API would send) and write-backs to the store. Errors are per object: a command
the writer refuses or a write-back that lost its compare-and-set is reported and the round goes
on. The writer or the store not answering ends the round; it is retried with backoff.

When rounds run:
    Consul store   at start, on every change of the KV tree, after writer events (debounced:
                   REST changes are written back within a fraction of a second), every
                   ``resync`` seconds, and on ``store.sync``
    file store     at start, when the directory's files change, and on ``store.sync``; REST
                   changes on such a host are not written anywhere and are reverted at the next
                   round (the store is read-only; qk4l refused them in the API instead)

What is lost: the base lives in memory only, so after a restart of discovery the first round
treats the store as authoritative (an empty store is seeded from the writer instead); changes
made over REST while discovery was down are then reverted to the store's version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
import gevent
import gevent.event
import gevent.queue
import msgspec

from gorb.common import errors, messages
from gorb.common.errors import GorbError
from gorb.common.store_messages import (
    STATUS_OK,
    STATUS_PARTIAL,
    STATUS_REFUSED,
    ObjectError,
    StatusRequest,
    StoreStatus,
    SyncRequest,
    SyncResult,
)
from gorb.common.transport import PeerUnavailable, TransportError
from gorb.common.validation import canonical_ip
from gorb.services.discovery import documents as docs
from gorb.services.discovery import reconcile
from gorb.services.discovery.blocking import Backoff
from gorb.services.discovery.stores import StoreConflict, StoreUnavailable

log = logging.getLogger("discovery")

# A writer answer that means "already so" for a delete: the object is gone, as wanted.
_IDEMPOTENT = {("service.delete", errors.NOT_FOUND), ("backend.delete", errors.NOT_FOUND)}


class Unavailable(PeerUnavailable):
    """The writer or the store did not answer: the round is abandoned and retried."""


class Syncer:
    def __init__(self, store, client, max_delete_share: float = 0.5,
                 resolve: Callable[[str], str] = canonical_ip,
                 backoff: Backoff | None = None, resync: float | None = 30.0,
                 debounce: float = 0.1, clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.client = client
        self.max_delete_share = max_delete_share
        self.resolve = resolve
        self.backoff = backoff or Backoff()
        self.resync = resync
        self.debounce = debounce
        self.clock = clock
        self.base: reconcile.Base | None = None
        self.last: SyncResult | None = None  # the last round's outcome
        self._started = False
        self._refused_logged: str | None = None
        self._errors_logged: dict[str, str] = {}  # documents reported bad, logged once each
        self._queue: gevent.queue.Queue = gevent.queue.Queue()

    # requests from other greenlets ---------------------------------------------------------------

    def wake(self) -> None:
        """Ask for a round soon (a store change or a writer event)."""
        self._queue.put(None)

    def request(self, req: SyncRequest | StatusRequest, timeout: float = 30.0) -> dict:
        """Answer a control request (the reply body); runs in the sync loop, one at a time."""
        result = gevent.event.AsyncResult()
        self._queue.put((req, result))
        try:
            return result.get(timeout=timeout)
        except gevent.Timeout:
            return messages.fail(GorbError(errors.UNAVAILABLE, "the store sync is busy"))

    # the loop ----------------------------------------------------------------------------------

    def loop(self) -> None:
        retry_at: float | None = self.clock()  # the first round, at once
        next_resync = self.clock() + self.resync if self.resync else None
        while True:
            deadlines = [t for t in (retry_at, next_resync) if t is not None]
            timeout = max(0.0, min(deadlines) - self.clock()) if deadlines else None
            try:
                item = self._queue.get(timeout=timeout)
            except gevent.queue.Empty:
                item = None
            if item is not None:
                req, result = item
                result.set(self._answer(req))
                continue
            gevent.sleep(self.debounce)
            self._drain_wakes()
            try:
                self.run_round()
            except Unavailable as exc:
                delay = self.backoff.next()
                if self.backoff.failures == 1:
                    log.warning("store sync postponed: %s (retrying)", exc)
                retry_at = self.clock() + delay
                continue
            if self.backoff.failures:
                log.info("store sync: caught up")
            self.backoff.reset()
            retry_at = None
            if self.resync:
                next_resync = self.clock() + self.resync

    def _drain_wakes(self) -> None:
        """Fold queued wake-ups into this round; control requests stay queued, in order."""
        kept = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                kept.append(item)
        for item in kept:
            self._queue.put(item)

    # rounds ------------------------------------------------------------------------------------

    def _inputs(self, force: bool) -> tuple[reconcile.Plan, reconcile.Base | None]:
        try:
            views = messages.data_of("state.dump", self.client.request(
                "state.dump", {"stats": False}))["services"]
        except (TransportError, messages.Refused) as exc:
            raise Unavailable(f"ipvs-writer: {exc}") from None
        try:
            objects = self.store.read()
        except StoreUnavailable as exc:
            raise Unavailable(str(exc)) from None
        base = self.base if self._started else reconcile.initial_base(objects,
                                                                     self.store.writable)
        plan = reconcile.plan(objects, views, base, writable=self.store.writable, force=force,
                              max_delete_share=self.max_delete_share, resolve=self.resolve)
        return plan, base

    def run_round(self, force: bool = False) -> SyncResult:
        plan, base = self._inputs(force)
        errs = plan.error_list()
        for key, reason in plan.errors.items():
            if self._errors_logged.get(key) != reason:
                log.warning("store: %s left alone: %s", key, reason)
        self._errors_logged = dict(plan.errors)
        if plan.refused:
            if self._refused_logged != plan.refused:
                log.warning("store sync refused: %s", plan.refused)
                self._refused_logged = plan.refused
            self.last = SyncResult(STATUS_REFUSED, [], errs, plan.refused)
            return self.last
        self._refused_logged = None
        applied, done = [], {}
        try:
            for i, action in enumerate(plan.actions):
                done[i] = self._run_action(action, applied, errs)
        finally:
            self.base = reconcile.next_base(base, plan, done)
            self._started = True
        self.last = SyncResult(STATUS_PARTIAL if errs else STATUS_OK, applied, errs)
        return self.last

    def _run_action(self, action: reconcile.Action, applied: list, errs: list) -> bool:
        for step in action.steps:
            try:
                if step.op.startswith("store."):
                    self.store.write(step)
                else:
                    self._command(step)
            except (StoreConflict, GorbError) as exc:
                reason = exc.reason if isinstance(exc, GorbError) else str(exc)
                log.warning("store sync: %s %s: %s", step.op, action.label, reason)
                errs.append(ObjectError(action.label, f"{step.op}: {reason}"))
                return False
            except StoreUnavailable as exc:
                raise Unavailable(str(exc)) from None
            if step.key == docs.MARKER:
                continue  # bookkeeping, not a change anyone asked for
            log.info("store sync: %s %s", step.op, step.key or action.label)
            applied.append(step.change())
        return True

    def _command(self, step: reconcile.Step) -> None:
        try:
            messages.data_of(step.op, self.client.request(step.op, step.body))
        except TransportError as exc:
            raise Unavailable(f"ipvs-writer: {exc}") from None
        except messages.Refused as exc:
            if (step.op, exc.errno) in _IDEMPOTENT:
                return
            raise GorbError(exc.errno if exc.errno in errors.HTTP_STATUS
                            and exc.errno != errors.OK else errors.INTERNAL,
                            exc.reason or str(exc.errno)) from None

    # control requests ----------------------------------------------------------------------------

    def _answer(self, req: SyncRequest | StatusRequest) -> dict:
        try:
            if isinstance(req, StatusRequest):
                return messages.ok(msgspec.to_builtins(self.status()))
            result = self.run_round(force=req.force)
        except Unavailable as exc:
            return messages.fail(GorbError(errors.UNAVAILABLE, str(exc)))
        data = msgspec.to_builtins(result)
        if result.status == STATUS_REFUSED:
            return {"ok": False, "errno": errors.INVALID,
                    "reason": f"sync refused: {result.refused}", "data": data}
        return messages.ok(data)

    def status(self) -> StoreStatus:
        """The dry run: what a ``store.sync`` without force would do now."""
        plan, _ = self._inputs(force=False)
        services, backends, writes = plan.diff()
        return StoreStatus(plan.status(), self.store.location, services, backends, writes,
                           plan.refused, plan.error_list())

