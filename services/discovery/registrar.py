"""The registration loop: keeps the local Consul agent's registrations and checks equal to the
writer's services (``gorb.services.discovery.registry`` says what they should be).

A cycle: ``state.dump`` from the writer, ``GET /v1/agent/services``, then register what is missing
or different (an agent restarted with an empty state, a service changed), deregister ours that are
gone, and set each check's status. A full cycle, every ``check_interval`` seconds, refreshes every
check (their TTL is 3 intervals); writer events (a service changed, a backend's health moved) start
a cycle at once that pushes only what changed.

Consul not answering never stops anything else: the cycle is abandoned, retried after a backoff
(doubling up to ``retry_max``), and the first cycle that gets through re-makes everything. A
refusal for one service (ACL, bad request) is logged and the others go on. The writer not
answering skips the cycle (registrations stay as they are: nothing is deregistered for it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import gevent
import gevent.event

from gorb.common import messages
from gorb.common.transport import PeerUnavailable, TransportError
from gorb.services.discovery import registry
from gorb.services.discovery.blocking import Backoff
from gorb.services.discovery.consul_adapter import ConsulAdapter, ConsulRefused, ConsulUnavailable

log = logging.getLogger("discovery")


class Registrar:
    def __init__(self, adapter: ConsulAdapter, client, hostname: str,
                 check_interval: float = 10.0, backoff: Backoff | None = None,
                 debounce: float = 0.1, clock: Callable[[], float] = time.monotonic,
                 id_format: str = registry.DEFAULT_ID_FORMAT):
        self.adapter = adapter
        self.client = client
        self.hostname = hostname
        self.id_format = id_format
        self.conflicts: dict[str, str] = {}
        self.check_interval = check_interval
        self.ttl = registry.ttl(check_interval)
        self.backoff = backoff or Backoff()
        self.debounce = debounce
        self.clock = clock
        self.pushed: dict[str, tuple[str, str]] = {}  # service id -> last check status sent
        self.cycles = 0
        self._wake = gevent.event.Event()

    def wake(self) -> None:
        self._wake.set()

    def _views(self) -> dict:
        try:
            return messages.data_of("state.dump", self.client.request(
                "state.dump", {"stats": False}))["services"]
        except TransportError as exc:
            raise PeerUnavailable(f"ipvs-writer: {exc}") from None
        except messages.Refused as exc:
            raise PeerUnavailable(f"ipvs-writer: {exc}") from None

    def _register(self, reg: registry.Registration, status: tuple[str, str]) -> None:
        check = self.adapter.ttl_check(self.ttl, status[0], f"gorb {reg.service_id}", status[1])
        self.adapter.register(reg.service_id, reg.name, reg.address, reg.port, list(reg.tags),
                              reg.meta_dict(), check)
        self.adapter.check_status(reg.check_id, *status)  # the note, and a fresh TTL
        self.pushed[reg.service_id] = status

    def cycle(self, full: bool) -> None:
        views = self._views()
        want = registry.desired(views, self.hostname, self.id_format)
        plan = registry.agent_plan(want, self.adapter.agent_services(), self.hostname)
        for sid, host in plan.conflicts.items():
            if self.conflicts.get(sid) != host:
                log.error("Consul: the agent holds %s registered by gorb host %s: not replaced "
                          "(gorb hosts sharing an agent need discovery.id_format with {host})",
                          sid, host)
        self.conflicts = plan.conflicts
        for sid in plan.deregister:
            self._isolated(f"deregister {sid}", self.adapter.deregister, sid)
            self.pushed.pop(sid, None)
        made = set()
        for reg in plan.register:
            if self._isolated(f"register {reg.service_id}", self._register, reg,
                              registry.check_status(views[reg.name])):
                log.info("registered %s in Consul (%s:%d)", reg.service_id, reg.address,
                         reg.port)
                made.add(reg.service_id)
        for sid, reg in want.items():
            status = registry.check_status(views[reg.name])
            if sid in made or sid in plan.conflicts or (
                    not full and self.pushed.get(sid) == status):
                continue
            known = self._isolated(f"check {sid}", self.adapter.check_status, reg.check_id,
                                   *status)
            if known is False:  # the agent lost the check but kept the service: re-make both
                self._isolated(f"register {sid}", self._register, reg, status)
            elif known:
                if self.pushed.get(sid, status)[0] != status[0]:
                    log.info("Consul check of %s: %s (%s)", sid, status[0], status[1])
                self.pushed[sid] = status
        for sid in set(self.pushed) - set(want):
            del self.pushed[sid]
        self.cycles += 1

    def _isolated(self, what: str, fn, *args):
        """Run one agent call; a refusal is logged and the cycle goes on (None)."""
        try:
            result = fn(*args)
        except ConsulRefused as exc:
            log.error("Consul: %s: %s", what, exc)
            return None
        return True if result is None else result

    def loop(self) -> None:
        next_full = self.clock()
        while True:
            full = self.clock() >= next_full
            try:
                self.cycle(full)
            except (ConsulUnavailable, PeerUnavailable) as exc:
                if self.backoff.failures == 0:
                    log.warning("registration postponed: %s (retrying with backoff)", exc)
                gevent.sleep(self.backoff.next())
                next_full = self.clock()  # catch up: re-check and refresh everything
                continue
            if self.backoff.failures:
                log.info("registration: Consul and the writer reachable again; caught up")
                self.backoff.reset()
            if full:
                next_full = self.clock() + self.check_interval
            self._wake.clear()
            if self._wake.wait(timeout=max(0.0, next_full - self.clock())):
                gevent.sleep(self.debounce)  # fold a burst of events into one cycle
