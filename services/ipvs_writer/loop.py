"""The writer's event loop: a ``zmq.Poller`` over the request socket with a reconcile deadline.

Requests queued on the ROUTER socket are drained together (up to ``max_batch``) so that mutations
arriving back to back are group-committed: one state-file write and one netlink batch for all of
them. Reads are answered in arrival order, after the mutations that came before them. A read
that needs a newer snapshot of the kernel than the statistics collector has sent
(``reader.py``) waits in ``pending`` with the desired state it arrived at (``Pinned``: the
records are immutable, so this is a reference) and is answered of that state when a snapshot
arrives, or with an error after ``read_deadline`` seconds: the loop never dumps the kernel for a
read, and a read never sees a mutation that came after it. Health
results pushed by the pulse workers (PULL socket) are drained and applied the same way; after a
mutation that changed check targets, the workers of the shards concerned are told to re-pull
theirs (``pulse.targets.changed``, ``gorb.common.pulse_messages.TargetsChanged``): a weight
change or a health verdict tells none.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import msgspec
import zmq

from gorb.common import errors, messages, runtime
from gorb.common.envelope import Envelope
from gorb.common.errors import GorbError
from gorb.common.transport import Publisher, Puller, RouterServer
from gorb.services.ipvs_writer.engine import Engine, Pinned

log = logging.getLogger(__name__)
SRC = "ipvs-writer"
LATENCY_KEPT = 100_000


class WriterLoop:
    def __init__(self, engine: Engine, ctx: zmq.Context, runtime_dir: str,
                 reconcile_interval: float, max_batch: int = 1000, read_deadline: float = 10.0):
        self.engine = engine
        self.router = RouterServer(ctx, runtime.endpoint(runtime_dir, runtime.WRITER))
        self.publisher = Publisher(ctx, runtime.endpoint(runtime_dir, runtime.EVENTS), SRC)
        self.health = Puller(ctx, runtime.endpoint(runtime_dir, runtime.HEALTH))
        self.reconcile_interval = reconcile_interval
        self.max_batch = max_batch
        self.running = True
        # receive-to-reply seconds of the last mutations (``writer.latency``)
        self.latency: deque[float] = deque(maxlen=LATENCY_KEPT)
        # reads waiting for a snapshot: (identity, request, when it arrived, the state then)
        self.pending: list[tuple[bytes, Envelope, float, Pinned]] = []
        self.read_deadline = read_deadline

    def close(self) -> None:
        self.router.close()
        self.publisher.close()
        self.health.close()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router.socket, zmq.POLLIN)
        poller.register(self.health.socket, zmq.POLLIN)
        snapshots, polled = self.engine.snapshots, None
        next_reconcile = time.monotonic() + self.reconcile_interval
        while self.running:
            if snapshots is not None and polled != snapshots.fileno():
                if polled is not None:
                    poller.unregister(polled)
                polled = snapshots.fileno()  # a new one after the collector was restarted
                poller.register(polled, zmq.POLLIN)
            # Short waits so a SIGTERM (which only sets a flag) is acted on promptly.
            wait = min(0.5, max(0.0, next_reconcile - time.monotonic()))
            ready = dict(poller.poll(timeout=wait * 1000))
            if self.router.socket in ready:
                received = time.perf_counter()
                self.serve(self.router.recv_many(self.max_batch), received)
            if self.health.socket in ready:
                self._health()
            if snapshots is not None:
                if polled in ready and snapshots.receive():
                    self._retry_pending()
                snapshots.check()
                self._expire_pending()
            self._notify_targets()
            if time.monotonic() >= next_reconcile:
                self.reconcile()
                next_reconcile = time.monotonic() + self.reconcile_interval

    def _health(self) -> None:
        results = self.health.recv_many(self.max_batch)
        for topic, type_, body in self.engine.handle_health([e.body for e in results
                                                             if e.type == "health.results"]):
            self.publisher.publish(topic, type_, body)

    def _notify_targets(self) -> None:
        notice = self.engine.take_targets_changed()
        if notice is not None:
            self.publisher.publish("pulse.targets.changed", "pulse.targets.changed",
                                   msgspec.to_builtins(notice))

    def _retry_pending(self) -> None:
        waiting, self.pending = self.pending, []
        for identity, env, since, pinned in waiting:
            self._answer(identity, env, since, pinned)

    def _expire_pending(self) -> None:
        if not self.pending or time.monotonic() - self.pending[0][2] < self.read_deadline:
            return
        now, kept = time.monotonic(), []
        for identity, env, since, pinned in self.pending:
            if now - since < self.read_deadline:
                kept.append((identity, env, since, pinned))
                continue
            err = GorbError(errors.KERNEL, f"{errors.MSG_IPVS}: no statistics snapshot of the "
                            f"kernel within {self.read_deadline:g} s (the collector's dumps "
                            f"failed {self.engine.snapshots.failures} time(s); see the log)")
            self.router.reply(identity, env, messages.fail(err), SRC)
        self.pending = kept

    def reconcile(self) -> None:
        repaired, failures = self.engine.converge()
        if repaired:
            log.warning("reconcile: repaired drift with %d op(s), %d failed", repaired, len(failures))
            self.publisher.publish("writer.reconciled", "writer.reconciled",
                                   {"repaired": repaired, "errors": failures})

    def serve(self, batch: list[tuple[bytes, Envelope]], received: float | None = None) -> None:
        """Answer ``batch`` (received at ``received``, perf_counter seconds)."""
        received = time.perf_counter() if received is None else received
        run: list[tuple[bytes, Envelope]] = []
        for identity, env in batch:
            if env.type in messages.MUTATIONS:
                run.append((identity, env))
                continue
            self._mutate(run, received)
            run = []
            self._answer(identity, env, time.monotonic())
        self._mutate(run, received)

    def _answer(self, identity: bytes, env: Envelope, since: float,
                pinned: Pinned | None = None) -> None:
        """Reply to the read ``env`` (waiting since ``since``, of the state ``pinned`` when it
        came), or keep it in ``pending`` with the state it must be answered of."""
        reply = self._read(env, pinned)
        if isinstance(reply, Pinned):
            self.pending.append((identity, env, since, reply))
        else:
            self.router.reply(identity, env, reply, SRC)

    def _read(self, env: Envelope, pinned: Pinned | None = None) -> dict | Pinned:
        if env.type != "writer.latency":
            return self.engine.read(env.type, env.body, pinned)
        try:
            req = messages.decode_request(env.type, env.body)
        except GorbError as err:
            return messages.fail(err)
        reply = messages.ok({"seconds": list(self.latency)})
        if req.clear:
            self.latency.clear()
        return reply

    def _mutate(self, run: list[tuple[bytes, Envelope]], received: float) -> None:
        if not run:
            return
        answers = self.engine.handle_batch([(env.type, env.body) for _, env in run])
        for (identity, env), (reply, events) in zip(run, answers):
            self.router.reply(identity, env, reply, SRC)
            for topic, type_, body in events:
                self.publisher.publish(topic, type_, body)
        self.latency.extend([time.perf_counter() - received] * len(run))
