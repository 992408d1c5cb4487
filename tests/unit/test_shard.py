"""Rendezvous sharding: stable, balanced, and moving few targets when the count changes."""

from collections import Counter

import pytest

from gorb.common.shard import owner

pytestmark = pytest.mark.timeout(5)
KEYS = [f"tcp|10.1.{i // 250}.{i % 250}|8080|{i}" for i in range(4000)]


def test_every_target_has_exactly_one_owner_in_range():
    for n in (1, 2, 3, 8):
        assert all(0 <= owner(k, n) < n for k in KEYS)
    assert {owner(k, 1) for k in KEYS} == {0}


def test_stable_across_calls():
    assert [owner(k, 4) for k in KEYS[:100]] == [owner(k, 4) for k in KEYS[:100]]


@pytest.mark.parametrize("n", [2, 3, 4])
def test_balanced(n):
    counts = Counter(owner(k, n) for k in KEYS)
    assert max(counts.values()) - min(counts.values()) < len(KEYS) / n * 0.15


def test_growing_from_2_to_3_moves_about_a_third_and_only_to_the_new_worker():
    moved = [k for k in KEYS if owner(k, 2) != owner(k, 3)]
    assert all(owner(k, 3) == 2 for k in moved)
    assert 0.25 < len(moved) / len(KEYS) < 0.42


def test_refuses_zero_workers():
    with pytest.raises(ValueError):
        owner("x", 0)
