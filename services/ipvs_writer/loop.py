"""The writer's event loop: a ``zmq.Poller`` over the request socket with a reconcile deadline.

Requests queued on the ROUTER socket are drained together (up to ``max_batch``) so that mutations
arriving back to back are group-committed: one state-file write and one netlink batch for all of
them. Reads are answered in arrival order, after the mutations that came before them. Health
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

from gorb.common import messages, runtime
from gorb.common.envelope import Envelope
from gorb.common.errors import GorbError
from gorb.common.transport import Publisher, Puller, RouterServer
from gorb.services.ipvs_writer.engine import Engine

log = logging.getLogger(__name__)
SRC = "ipvs-writer"
LATENCY_KEPT = 100_000


class WriterLoop:
    def __init__(self, engine: Engine, ctx: zmq.Context, runtime_dir: str,
                 reconcile_interval: float, max_batch: int = 1000):
        self.engine = engine
        self.router = RouterServer(ctx, runtime.endpoint(runtime_dir, runtime.WRITER))
        self.publisher = Publisher(ctx, runtime.endpoint(runtime_dir, runtime.EVENTS), SRC)
        self.health = Puller(ctx, runtime.endpoint(runtime_dir, runtime.HEALTH))
        self.reconcile_interval = reconcile_interval
        self.max_batch = max_batch
        self.running = True
        # receive-to-reply seconds of the last mutations (``writer.latency``)
        self.latency: deque[float] = deque(maxlen=LATENCY_KEPT)

    def close(self) -> None:
        self.router.close()
        self.publisher.close()
        self.health.close()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router.socket, zmq.POLLIN)
        poller.register(self.health.socket, zmq.POLLIN)
        next_reconcile = time.monotonic() + self.reconcile_interval
        while self.running:
            # Short waits so a SIGTERM (which only sets a flag) is acted on promptly.
            wait = min(0.5, max(0.0, next_reconcile - time.monotonic()))
            ready = dict(poller.poll(timeout=wait * 1000))
            if self.router.socket in ready:
                received = time.perf_counter()
                self.serve(self.router.recv_many(self.max_batch), received)
            if self.health.socket in ready:
                results = self.health.recv_many(self.max_batch)
                for topic, type_, body in self.engine.handle_health([e.body for e in results
                                                                     if e.type == "health.results"]):
                    self.publisher.publish(topic, type_, body)
            notice = self.engine.take_targets_changed()
            if notice is not None:
                self.publisher.publish("pulse.targets.changed", "pulse.targets.changed",
                                       msgspec.to_builtins(notice))
            if time.monotonic() >= next_reconcile:
                self.reconcile()
                next_reconcile = time.monotonic() + self.reconcile_interval

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
            self.router.reply(identity, env, self._read(env), SRC)
        self._mutate(run, received)

    def _read(self, env: Envelope) -> dict:
        if env.type != "writer.latency":
            return self.engine.read(env.type, env.body)
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
