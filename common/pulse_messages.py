"""The pulse message family: check targets the writer hands out, results the workers push back.

    pulse.targets   request  {"worker": 0, "workers": 2}
                    reply    data: {"targets": [Target, ...]}   # only that worker's shard
    health.results  PUSH     {"worker": 0, "full": false, "results": [Outcome, ...]}
    pulse.targets.changed    event (topic "pulse.targets.changed", body {}): re-pull

A target is one check: the same address, port and check under several services is one target
(checked once); ``key`` (``gorb.common.check_spec.CheckSpec.key`` plus the timing) names it everywhere. ``status``/``since`` seed a worker's tracker with the
writer's last known status, so a restarted or rebalanced worker does not flap weights.
``full`` marks a periodic resend of every target's latest outcome (lost messages heal).
"""

from __future__ import annotations

from typing import Any

import msgspec


class Target(msgspec.Struct, frozen=True):
    key: str
    type: str
    address: str
    port: int
    args: dict[str, Any] | None
    timeout: float
    interval: float
    rise: int
    fall: int
    backoff_max: float
    jitter: float
    status: str = "unknown"
    since: float = 0.0


class TargetsRequest(msgspec.Struct, forbid_unknown_fields=True):
    worker: int
    workers: int


class Outcome(msgspec.Struct, frozen=True):
    key: str
    ok: bool
    status: str            # the tracker's status after this result: up | down | unknown
    at: float              # wall-clock time of the check's end
    latency: float = 0.0   # seconds
    error: str = ""
    checks: int = 0
    passes: int = 0        # consecutive
    failures: int = 0      # consecutive
    health: float = 1.0    # share of recent checks passed


class HealthResults(msgspec.Struct, forbid_unknown_fields=True):
    worker: int
    results: list[Outcome]
    full: bool = False


class TargetsChanged(msgspec.Struct):
    """``pulse.targets.changed`` (writer -> pulse workers, on the events socket): the shards of
    ``workers`` whose targets changed, so only their workers re-pull. ``workers`` 0 means every
    shard (the writer has not been told yet how the checks are split)."""

    workers: int = 0
    shards: list[int] = []


def concerns(msg: TargetsChanged, index: int, workers: int) -> bool:
    """Whether worker ``index`` of ``workers`` must re-pull its targets."""
    return msg.workers != workers or index in msg.shards
