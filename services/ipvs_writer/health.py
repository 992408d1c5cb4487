"""Health results (pure): pulse's outcomes turned into each backend's new health in a draft.

``apply_results`` takes the bodies of ``health.results`` messages as pulse workers push them and
changes the health of every backend each outcome stands for (a target shared by several
backends updates them all); ``_health_after`` is one backend's transition. The engine saves
and applies what changed (``engine.Engine.handle_health``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import msgspec

from gorb.common.pulse_messages import HealthResults, Outcome
from gorb.services.ipvs_writer.staging import Draft
from gorb.services.ipvs_writer.targets import Member, TargetGroup, slow_start
from gorb.services.ipvs_writer.weights import UNKNOWN, UP, Health, SlowStart, transition

log = logging.getLogger(__name__)

Event = tuple[str, str, dict]


def apply_results(draft: Draft, groups: dict[str, TargetGroup], bodies: list[dict], now: float,
                  observed: dict[Member, Outcome]) -> tuple[set[str], list[Event]]:
    """Record each outcome in ``observed`` and the health it gives in ``draft``; the services
    whose backends' health changed, and the status-change events."""
    touched: set[str] = set()
    events: list[Event] = []
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
                observed[member] = outcome
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
                draft.set_backend(vsid, rsid, msgspec.structs.replace(backend, health=new))
                touched.add(vsid)
    return touched, events


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
