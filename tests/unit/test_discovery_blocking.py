"""Consul's blocking-query index rules and the retry backoff."""

from __future__ import annotations

import random

import pytest

from gorb.services.discovery.blocking import Backoff, next_index

pytestmark = pytest.mark.timeout(5)

INDEX = [
    # (previous, returned, next, changed)
    (0, 12, 12, True),        # first answer
    (12, 12, 12, False),      # wait timed out: nothing new
    (12, 15, 15, True),       # moved on
    (15, 3, 0, True),         # went backwards: reset, re-read everything
    (0, 3, 3, True),          # ...the re-read
    (0, 0, 1, True),          # a broken 0 must not make every query return at once
    (1, 0, 1, False),         # still broken: wait at 1 (an index of 1 re-reads anyway)
    (0, -5, 1, True),
]


@pytest.mark.parametrize("previous,returned,nxt,changed", INDEX)
def test_next_index(previous, returned, nxt, changed):
    assert next_index(previous, returned) == (nxt, changed)


def test_backoff_doubles_to_the_cap_and_resets():
    b = Backoff(first=0.5, cap=4.0, jitter=0.0)
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    b.reset()
    assert b.next() == 0.5


def test_backoff_jitter_only_shortens():
    b = Backoff(first=1.0, cap=30.0, jitter=0.1, rng=random.Random(1))
    delays = [b.next() for _ in range(10)]
    assert all(0.9 * min(30, 2 ** i) <= d <= min(30, 2 ** i) for i, d in enumerate(delays))
