"""Pure bookkeeping of the loops that talk to Consul: the blocking-query index rule and the
retry backoff.

Consul's rules for blocking queries (developer.hashicorp.com/consul/api-docs/features/blocking,
"Implementation details"), as ``next_index`` applies them:
- the ``X-Consul-Index`` of an answer is the index of the next query;
- it must be at least 1: an index of 0 or less (a Consul bug) would make every following query
  return at once (a busy loop), so it is taken as 1;
- if it goes backwards (a snapshot restore, a new cluster, the double's ``index_backwards``),
  reset to 0: the next query answers at once with the whole current state.

``Backoff`` is the delay before the next attempt after consecutive failures: doubling from
``first`` up to ``cap`` (GORB had no retry at all: a failed registration was only logged), with
up to ``jitter`` of it randomised so that many hosts do not retry in step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


def next_index(previous: int, returned: int) -> tuple[int, bool]:
    """(index for the next query, whether the tree may have changed since ``previous``)."""
    if returned < 1:
        return 1, previous != 1
    if returned < previous:
        return 0, True
    return returned, returned != previous


@dataclass
class Backoff:
    first: float = 0.5
    cap: float = 30.0
    jitter: float = 0.1
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def next(self) -> float:
        """The delay after one more failure."""
        delay = min(self.cap, self.first * (2 ** min(self.failures, 30)))
        self.failures += 1
        return delay * (1 - self.jitter * self.rng.random())

    def reset(self) -> None:
        self.failures = 0
