"""Weight math: drain, down, slow start by checks or seconds, fail-open."""

import pytest

from gorb.services.ipvs_writer.weights import (
    DOWN,
    UNKNOWN,
    UP,
    Health,
    SlowStart,
    held_in,
    transition,
    weight,
)

pytestmark = pytest.mark.timeout(5)


def walk(events: list[str], slow: SlowStart, configured: int = 100) -> list[int]:
    """Weights after each reported status ("up" = a passed check while up), one per second."""
    h = Health()
    out = []
    for t, status in enumerate(events):
        h = transition(h, status, float(t), slow)
        out.append(weight(configured, h))
    return out


def test_first_seen_up_gets_full_weight_at_once():
    assert walk([UP, UP], SlowStart(checks=10)) == [100, 100]


def test_down_is_zero_and_recovery_climbs_over_the_configured_checks():
    got = walk([UP, DOWN, DOWN] + [UP] * 6, SlowStart(checks=5))
    assert got == [100, 0, 0, 20, 40, 60, 80, 100, 100]


def test_default_slow_start_is_at_most_ten_checks():
    got = walk([DOWN] + [UP] * 11, SlowStart())
    assert got[-2:] == [100, 100] and got[10] == 100 and got[9] == 90


def test_a_failure_while_climbing_goes_back_to_zero_and_restarts_the_climb():
    got = walk([DOWN, UP, UP, DOWN, UP], SlowStart(checks=4))
    assert got == [0, 25, 50, 0, 25]


def test_small_weights_never_truncate_to_zero_while_up():
    """GORB issue #47: weight 1 x partial health truncated to 0."""
    assert walk([DOWN, UP, UP], SlowStart(checks=10), configured=1) == [0, 1, 1]
    assert walk([DOWN, UP], SlowStart(checks=10), configured=3) == [0, 1]


def test_slow_start_by_seconds_advances_with_each_result():
    slow = SlowStart(seconds=10)
    h = transition(transition(Health(), DOWN, 0.0, slow), UP, 100.0, slow)
    got = []
    for now in (102.5, 105.0, 110.0, 200.0):
        h = transition(h, UP, now, slow)
        got.append(weight(100, h))
    assert got == [25, 50, 100, 100]


def test_zero_slow_start_restores_at_once():
    assert walk([DOWN, UP], SlowStart(checks=0)) == [0, 100]


def test_manual_drain_holds_whatever_the_checks_say():
    h = transition(Health(), UP, 0.0)
    assert weight(0, h) == 0
    assert weight(0, h, held=True) == 0


def test_unknown_counts_as_in():
    assert weight(100, Health(UNKNOWN)) == 100


def test_down_since_is_kept_across_repeated_down_reports():
    h = transition(Health(), DOWN, 5.0)
    assert transition(h, DOWN, 9.0).since == 5.0


@pytest.mark.parametrize("backends, fail_open, held", [
    # threshold 0: nothing held
    ([("a", 100, DOWN), ("b", 100, DOWN)], 0.0, set()),
    # half must stay in: 2 of 4 down is fine, 3 of 4 holds the last one to fail
    ([("a", 100, UP), ("b", 100, UP), ("c", 100, DOWN), ("d", 100, DOWN)], 0.5, set()),
    ([("a", 100, UP), ("b", 100, DOWN, 1), ("c", 100, DOWN, 3), ("d", 100, DOWN, 2)], 0.5, {"c"}),
    # all down with 0.5: two held, the latest failures
    ([("a", 100, DOWN, 1), ("b", 100, DOWN, 4), ("c", 100, DOWN, 3), ("d", 100, DOWN, 2)], 0.5,
     {"b", "c"}),
    # drained backends do not count towards the threshold
    ([("a", 0, UP), ("b", 100, DOWN, 1), ("c", 100, UP)], 0.5, set()),
    ([("a", 0, UP), ("b", 100, DOWN, 1), ("c", 100, DOWN, 2)], 0.5, {"c"}),
    # threshold 1: every down backend is held in
    ([("a", 100, DOWN, 1), ("b", 100, UP)], 1.0, {"a"}),
])
def test_fail_open_holds_in_the_last_failures(backends, fail_open, held):
    rows = [(b[0], b[1], Health(b[2], b[3] if len(b) > 3 else 0.0)) for b in backends]
    assert held_in(rows, fail_open) == held


def test_a_held_backend_keeps_its_configured_weight():
    h = Health(DOWN, 1.0)
    assert weight(100, h, held=True) == 100
    assert weight(100, h) == 0
