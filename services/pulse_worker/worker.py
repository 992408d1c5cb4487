"""A pulse worker: runs the checks of its shard concurrently and pushes results in batches.

Greenlets, each a named loop (a crashed loop ends the process so supervisord restarts it):

    sync       pulls this worker's targets from the writer at start, again on every
               ``pulse.targets.changed`` event (debounced) and every ``resync_every`` seconds
    schedule   runs each target's check when due (a heap of due times), at most ``concurrency``
               at a time; every result goes through the target's tracker
    send       pushes results to the writer: up to ``batch_max`` results or ``batch_wait`` seconds
               per message, and every ``full_every`` seconds the latest result of every target
               (``full``), so a lost message heals

A tracker is seeded with the writer's last known status, so a worker that restarts, or takes
over targets when the worker count changes, reports no transition that did not happen.
The same target (address, port and check) under several services is one key: checked once.
"""

from __future__ import annotations

import heapq
import logging
import random
import time
from collections.abc import Callable

import gevent
import gevent.event
import gevent.pool
import msgspec

from gorb.common import messages
from gorb.common import pulse_messages as pm
from gorb.common.transport import TransportError
from gorb.services.pulse_worker.checks import CheckSpec, run_check
from gorb.services.pulse_worker.tracker import Result, Timing, Tracker

log = logging.getLogger("pulse-worker")


class Worker:
    def __init__(self, index: int, workers: int, client, pusher, subscriber=None,
                 concurrency: int = 1000, batch_max: int = 100, batch_wait: float = 0.1,
                 full_every: float = 15.0, resync_every: float = 30.0,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, rng: random.Random | None = None):
        self.index, self.workers = index, workers
        self.client, self.pusher, self.subscriber = client, pusher, subscriber
        self.pool = gevent.pool.Pool(concurrency)
        self.batch_max, self.batch_wait = batch_max, batch_wait
        self.full_every, self.resync_every = full_every, resync_every
        self.clock, self.wall = clock, wall
        self.rng = rng or random.Random()
        self.trackers: dict[str, tuple[pm.Target, Tracker]] = {}
        self.heap: list[tuple[float, str]] = []
        self.outbox: list[pm.Outcome] = []
        self.latest: dict[str, pm.Outcome] = {}
        self.checks_done = 0
        self._wake = gevent.event.Event()
        self._resync = gevent.event.Event()
        self.synced = gevent.event.Event()

    # targets ------------------------------------------------------------------------------------

    def sync(self) -> None:
        """Take the writer's current targets for this shard (new ones seeded, gone ones dropped)."""
        try:
            data = messages.data_of("pulse.targets", self.client.request(
                "pulse.targets", {"worker": self.index, "workers": self.workers}))
        except messages.Refused as exc:
            raise RuntimeError(f"ipvs-writer: {exc}") from None
        wanted = {t["key"]: t for t in data["targets"]}
        now = self.clock()
        for key in list(self.trackers):
            if key not in wanted:
                del self.trackers[key]
                self.latest.pop(key, None)
        for key, raw in wanted.items():
            if key in self.trackers:
                continue
            target = pm.Target(**raw)
            timing = Timing(target.interval, target.timeout, target.rise, target.fall,
                            target.backoff_max, target.jitter)
            tracker = Tracker.new(timing, now, self.rng, status=target.status)
            self.trackers[key] = (target, tracker)
            heapq.heappush(self.heap, (tracker.next_due, key))
        self._wake.set()
        self.synced.set()
        log.info("worker %d/%d: %d target(s)", self.index, self.workers, len(self.trackers))

    def sync_loop(self) -> None:
        while True:
            try:
                self.sync()
            except (TransportError, RuntimeError) as exc:
                log.warning("cannot get targets from the writer (%s): retrying", exc)
                gevent.sleep(1.0)
                continue
            self._resync.wait(timeout=self.resync_every)
            self._resync.clear()
            gevent.sleep(0.2)  # debounce a burst of changes

    def events_loop(self) -> None:
        while True:
            got = self.subscriber.recv(timeout=None)
            if got is None:
                continue
            try:
                notice = msgspec.convert(got[1].body, pm.TargetsChanged)
            except msgspec.ValidationError:
                notice = pm.TargetsChanged()  # an older writer's empty hint: re-pull
            if pm.concerns(notice, self.index, self.workers):
                self._resync.set()

    # checks -------------------------------------------------------------------------------------

    def schedule_loop(self) -> None:
        while True:
            now = self.clock()
            while self.heap and self.heap[0][0] <= now:
                due, key = heapq.heappop(self.heap)
                entry = self.trackers.get(key)
                if entry is None or entry[1].next_due != due:
                    continue  # removed, or rescheduled since
                self.pool.spawn(self._check, key, entry)
            wait = self.heap[0][0] - now if self.heap else 1.0
            self._wake.clear()
            self._wake.wait(timeout=max(0.0, min(wait, 1.0)))

    def _check(self, key: str, entry: tuple[pm.Target, Tracker]) -> None:
        target, tracker = entry
        spec = CheckSpec(target.type, target.address, target.port, target.args or {},
                         target.timeout)
        result: Result = run_check(spec, self.clock)
        if self.trackers.get(key) is not entry:
            return  # dropped while the check ran
        changed = tracker.record(result, self.rng)
        self.checks_done += 1
        if changed:
            log.warning("target %s is %s%s", key, changed.upper(),
                        f": {result.error}" if result.error else "")
        outcome = pm.Outcome(key, result.ok, tracker.status, self.wall(), result.latency,
                             result.error, tracker.checks, tracker.passes, tracker.failures,
                             tracker.health)
        self.latest[key] = outcome
        self.outbox.append(outcome)
        heapq.heappush(self.heap, (tracker.next_due, key))
        if tracker.next_due < (self.heap[0][0] if self.heap else float("inf")) + 1e-9:
            self._wake.set()

    # results ------------------------------------------------------------------------------------

    def send_loop(self) -> None:
        next_full = self.clock() + self.full_every
        while True:
            gevent.sleep(self.batch_wait)
            while self.outbox:
                batch, self.outbox = self.outbox[:self.batch_max], self.outbox[self.batch_max:]
                self._push(batch, full=False)
            if self.clock() >= next_full:
                self._push(list(self.latest.values()), full=True)
                next_full = self.clock() + self.full_every

    def _push(self, outcomes: list[pm.Outcome], full: bool) -> None:
        for start in range(0, len(outcomes), max(self.batch_max, 1) * (10 if full else 1)):
            chunk = outcomes[start:start + self.batch_max * (10 if full else 1)]
            body = {"worker": self.index, "full": full,
                    "results": [msgspec.to_builtins(o) for o in chunk]}
            try:
                self.pusher.send("health.results", body, timeout=1.0)
            except TransportError as exc:
                log.warning("dropping %d result(s): writer not reachable (%s)", len(chunk), exc)

    # running ------------------------------------------------------------------------------------

    def loops(self) -> list[gevent.Greenlet]:
        names = [("sync", self.sync_loop), ("schedule", self.schedule_loop),
                 ("send", self.send_loop)]
        if self.subscriber is not None:
            names.append(("events", self.events_loop))
        greenlets = []
        for name, fn in names:
            g = gevent.Greenlet(fn)
            g.name = name
            greenlets.append(g)
        return greenlets
