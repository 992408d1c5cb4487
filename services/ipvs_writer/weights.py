"""Weight math: from a backend's configured weight and its health to the weight the kernel gets.

Pure (``now`` is passed in; the weight itself depends only on persisted values). The rules, GORB's as the base:
- a configured weight of 0 is a manual drain: 0 whatever the checks say, until changed;
- a down backend gets 0;
- a backend that comes back up climbs to its configured weight over ``slow_start`` passed checks
  (or seconds, when given as a duration) in equal steps, never below 1 while climbing; the level
  is advanced when results arrive, so a time-based climb moves at each check;
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

from gorb.common.model import DOWN, UNKNOWN, UP  # the status names, here too


class Health(msgspec.Struct, frozen=True):
    """What the writer keeps of a backend's health (persisted: a restart must not flap weights).

    ``level`` is the share of the configured weight the backend gets while up (1.0 = all of it;
    below 1 while climbing back after being down); ``passes`` counts passed checks since it came
    back up, ``up_at`` is when it did.
    """

    status: str = UNKNOWN
    since: float = 0.0
    level: float = 1.0
    passes: int = 0
    up_at: float = 0.0


@dataclass(frozen=True)
class SlowStart:
    checks: int = 10
    seconds: float = 0.0  # > 0: climb over this many seconds instead of checks


def _level(passes: int, up_at: float, slow: SlowStart, now: float) -> float:
    if slow.seconds > 0:
        return min(1.0, max(0.0, (now - up_at) / slow.seconds))
    if slow.checks <= 0:
        return 1.0
    return min(1.0, passes / slow.checks)


def transition(h: Health, status: str, now: float, slow: SlowStart = SlowStart()) -> Health:
    """The health after pulse reported ``status`` for one check (a change or one more result)."""
    if status == DOWN:
        return Health(DOWN, now if h.status != DOWN else h.since, 0.0, 0, 0.0)
    if status != UP:
        return h
    if h.status == UNKNOWN:
        return Health(UP, now, 1.0, 0, now)  # first seen up: full weight at once, as GORB
    if h.status == DOWN:
        return Health(UP, now, _level(1, now, slow, now), 1, now)  # back: start climbing
    if h.level >= 1.0:
        return h
    passes = h.passes + 1
    return msgspec.structs.replace(h, passes=passes, level=_level(passes, h.up_at, slow, now))


def weight(configured: int, h: Health, held: bool = False) -> int:
    """The kernel weight of one backend."""
    if configured <= 0:
        return 0
    if h.status == DOWN:
        return configured if held else 0
    if h.level >= 1.0:
        return configured
    return max(1, math.ceil(configured * h.level))


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
