"""Which pulse-worker owns a check target: rendezvous (highest random weight) hashing.

Every worker and the writer compute the same owner from the target's key and the worker count,
with no coordination. When the count changes, only the targets whose winning worker changed move
(about 1/N of them), so a rebalance disturbs few trackers.
"""

from __future__ import annotations

import hashlib


def owner(key: str, workers: int) -> int:
    """The index (0-based) of the worker that checks ``key`` among ``workers``."""
    if workers < 1:
        raise ValueError("at least one worker")
    return max(range(workers),
               key=lambda i: hashlib.blake2b(f"{i}\0{key}".encode(), digest_size=8).digest())
