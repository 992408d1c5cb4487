"""The health tracker of one check target: thresholds, backoff and jitter (pure: time is passed in).

A target is up or down; ``unknown`` until the first decision. ``fall`` consecutive failures take an
up (or unknown) target down, ``rise`` consecutive passes bring a down (or unknown) one up. While
down the target is checked less and less often: the delay doubles after every failure, up to
``backoff_max``. Every delay is spread by up to ``jitter`` of itself, so targets added together do
not stay in lock step; the first check of a new target comes at a random point of its first
interval (GORB's herd avoidance).

The tracker also keeps what operators see: the share of the last ``window`` checks that passed
(GORB's ``health``), consecutive passes and failures, the last result, its error and latency, and
the time of the last status change (for uptime).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from gorb.common.model import DOWN, UNKNOWN, UP  # the status names, here too

WINDOW = 100  # GORB's health window


@dataclass(frozen=True)
class Timing:
    interval: float          # seconds between checks of a healthy target
    timeout: float           # seconds a check may take
    rise: int = 1            # consecutive passes to come up
    fall: int = 1            # consecutive failures to go down
    backoff_max: float = 0   # cap of the delay while down; <= interval means no backoff
    jitter: float = 0.1      # each delay is spread by up to this share of itself


@dataclass
class Result:
    ok: bool
    at: float                # when the check finished (the tracker's clock)
    latency: float = 0.0     # seconds
    error: str = ""


@dataclass
class Tracker:
    timing: Timing
    status: str = UNKNOWN
    since: float = 0.0       # time of the last status change
    passes: int = 0          # consecutive
    failures: int = 0        # consecutive
    checks: int = 0
    last: Result | None = None
    next_due: float = 0.0
    window: deque = field(default_factory=lambda: deque(maxlen=WINDOW))

    @classmethod
    def new(cls, timing: Timing, now: float, rng: random.Random, status: str = UNKNOWN,
            since: float | None = None) -> Tracker:
        """A tracker whose first check is due within one interval; ``status`` seeds it (a worker
        that restarts takes the writer's last known status, so nothing flaps)."""
        t = cls(timing, status=status, since=now if since is None else since)
        t.next_due = now + rng.uniform(0, timing.interval)
        return t

    def record(self, result: Result, rng: random.Random) -> str | None:
        """Take one check result; return the new status if it changed, else None."""
        self.checks += 1
        self.last = result
        self.window.append(result.ok)
        if result.ok:
            self.passes += 1
            self.failures = 0
        else:
            self.failures += 1
            self.passes = 0
        changed = None
        if result.ok and self.status != UP and self.passes >= self.timing.rise:
            changed = UP
        elif not result.ok and self.status != DOWN and self.failures >= self.timing.fall:
            changed = DOWN
        if changed:
            self.status = changed
            self.since = result.at
        self.next_due = result.at + self.delay(rng)
        return changed

    def delay(self, rng: random.Random) -> float:
        """Seconds until the next check: the interval, doubled per failure while down (capped)."""
        base = self.timing.interval
        if self.status == DOWN and self.timing.backoff_max > base:
            doublings = min(self.failures - self.timing.fall, 30)
            base = min(base * 2 ** max(doublings, 0), self.timing.backoff_max)
        spread = base * self.timing.jitter
        return max(0.0, base + rng.uniform(-spread, spread))

    @property
    def health(self) -> float:
        """Share of the recent checks that passed (1.0 before any check, as GORB's pulse)."""
        return sum(self.window) / len(self.window) if self.window else 1.0

    def uptime(self, now: float) -> float:
        return now - self.since if self.status == UP else 0.0
