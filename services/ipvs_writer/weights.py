"""Weight math: from a backend's configured weight and its health to the weight the kernel gets.

Pure (``now`` is passed in). The rules, GORB's as the base:
- a configured weight of 0 is a manual drain: 0 whatever the checks say, until changed;
- a down backend gets 0;
- a backend that comes back up climbs to its configured weight over ``slow_start`` passed checks
  (or seconds, when ``slow_start_seconds`` is set) in equal steps, never below 1 while climbing;
  GORB needed 100 clean checks (about 100 minutes at its default), the default here is 10;
- a backend first seen up (never down) goes straight to its configured weight, as in GORB;
- fail-open (PyBal's depool threshold): a service never has fewer than ``fail_open`` of its
  (non-drained) backends in; when more are down, the ones that failed last are held in at their
  configured weight, and the caller says so loudly in logs and metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import msgspec

UP, DOWN, UNKNOWN = "up", "down", "unknown"


class Health(msgspec.Struct, frozen=True):
    """What the writer keeps of a backend's health (persisted: a restart must not flap weights).

    ``ramp`` counts passed checks since the backend came back up; -1 when not climbing.
    """

    status: str = UNKNOWN
    since: float = 0.0
    ramp: int = -1
    ramp_since: float = 0.0


@dataclass(frozen=True)
class SlowStart:
    checks: int = 10
    seconds: float = 0.0  # > 0: climb over this many seconds instead of checks


def transition(h: Health, status: str, now: float) -> Health:
    """The health after pulse reported ``status`` (a change or a passed check)."""
    if status == DOWN:
        return Health(DOWN, now if h.status != DOWN else h.since, -1, 0.0)
    if status == UP:
        if h.status == DOWN:
            return Health(UP, now, 1, now)  # back from down: start climbing
        if h.status == UNKNOWN:
            return Health(UP, now, -1, 0.0)  # first seen up: full weight at once
        if h.ramp >= 0:
            return msgspec.structs.replace(h, ramp=h.ramp + 1)
        return h
    return h


def ramp_fraction(h: Health, slow: SlowStart, now: float) -> float:
    if h.status != UP or h.ramp < 0:
        return 1.0
    if slow.seconds > 0:
        return min(1.0, max(0.0, (now - h.ramp_since) / slow.seconds))
    return min(1.0, h.ramp / max(1, slow.checks))


def settled(h: Health, slow: SlowStart, now: float) -> Health:
    """``h`` with a finished climb marked as finished (so it stops being reported as ramping)."""
    if h.ramp >= 0 and ramp_fraction(h, slow, now) >= 1.0:
        return msgspec.structs.replace(h, ramp=-1)
    return h


def weight(configured: int, h: Health, slow: SlowStart, now: float, held: bool = False) -> int:
    """The kernel weight of one backend."""
    if configured <= 0:
        return 0
    if h.status == DOWN:
        return configured if held else 0
    frac = ramp_fraction(h, slow, now)
    if frac >= 1.0:
        return configured
    return max(1, math.ceil(configured * frac))


def held_in(backends: list[tuple[str, int, Health]], fail_open: float) -> set[str]:
    """Backends (ids) kept in although down, so that at least ``fail_open`` of the service's
    non-drained backends stay in. ``backends`` is (id, configured weight, health)."""
    if fail_open <= 0:
        return set()
    eligible = [(rid, h) for rid, w, h in backends if w > 0]
    need = math.ceil(fail_open * len(eligible))
    up = sum(1 for _, h in eligible if h.status != DOWN)
    if up >= need:
        return set()
    down = sorted((h.since, rid) for rid, h in eligible if h.status == DOWN)
    return {rid for _, rid in down[-(need - up):]}  # the ones that failed last
