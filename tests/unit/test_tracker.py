"""The pulse tracker with an injected clock and random source: thresholds, backoff, jitter."""

import random

import pytest

from gorb.services.pulse_worker.tracker import DOWN, UNKNOWN, UP, Result, Timing, Tracker

pytestmark = pytest.mark.timeout(5)


class NoJitter(random.Random):
    """uniform(a, b) is always the midpoint: delays are exact."""

    def uniform(self, a, b):
        return (a + b) / 2


def feed(tracker: Tracker, outcomes: str, start: float = 0.0, step: float = 1.0) -> list:
    """Record 'p'/'f' outcomes one per ``step``; return the transitions (None when unchanged)."""
    rng = NoJitter()
    return [tracker.record(Result(ok=o == "p", at=start + i * step), rng)
            for i, o in enumerate(outcomes)]


@pytest.mark.parametrize("rise, fall, outcomes, transitions, final", [
    # GORB's behaviour (1/1): every result decides
    (1, 1, "p", [UP], UP),
    (1, 1, "f", [DOWN], DOWN),
    (1, 1, "pfp", [UP, DOWN, UP], UP),
    # fall 3: two failures are not enough, a pass in between resets the count
    (1, 3, "pff", [UP, None, None], UP),
    (1, 3, "pffpff", [UP, None, None, None, None, None], UP),
    (1, 3, "pfff", [UP, None, None, DOWN], DOWN),
    # rise 2 from down
    (2, 1, "fpfpp", [DOWN, None, None, None, UP], UP),
    # from unknown, the first threshold reached decides
    (2, 2, "pp", [None, UP], UP),
    (2, 2, "ff", [None, DOWN], DOWN),
    (2, 2, "pf", [None, None], UNKNOWN),
])
def test_thresholds(rise, fall, outcomes, transitions, final):
    t = Tracker(Timing(interval=1, timeout=1, rise=rise, fall=fall))
    assert feed(t, outcomes) == transitions
    assert t.status == final


def test_counters_last_result_and_health_window():
    t = Tracker(Timing(interval=1, timeout=1))
    assert t.health == 1.0  # before any check, as GORB's pulse
    feed(t, "ppfp")
    assert (t.passes, t.failures, t.checks) == (1, 0, 4)
    assert t.health == 0.75
    feed(t, "f" * 200, start=10)
    assert t.health == 0.0  # only the last 100 count
    assert t.failures == 200 and t.last.ok is False


def test_uptime_counts_from_the_last_change_to_up():
    t = Tracker(Timing(interval=1, timeout=1))
    feed(t, "f", start=0)
    feed(t, "pp", start=10)
    assert t.since == 10
    assert t.uptime(now=25) == 15
    feed(t, "f", start=30)
    assert t.uptime(now=40) == 0


def test_delay_is_the_interval_while_up():
    t = Tracker(Timing(interval=5, timeout=1, backoff_max=60, jitter=0))
    feed(t, "ppp")
    assert t.delay(NoJitter()) == 5
    assert t.next_due == 2 + 5  # last result at t=2


def test_backoff_doubles_while_down_up_to_the_cap():
    t = Tracker(Timing(interval=5, timeout=1, fall=2, backoff_max=30, jitter=0))
    rng = NoJitter()
    delays = []
    for i in range(7):
        t.record(Result(ok=False, at=i), rng)
        delays.append(t.delay(rng))
    # not down yet after the first failure; then 5, 10, 20, 30 (cap), 30...
    assert delays == [5, 5, 10, 20, 30, 30, 30]
    t.record(Result(ok=True, at=10), rng)
    assert t.status == UP and t.delay(rng) == 5  # recovered: back to the interval


def test_no_backoff_when_the_cap_is_not_above_the_interval():
    t = Tracker(Timing(interval=5, timeout=1, backoff_max=0, jitter=0))
    feed(t, "ffff")
    assert t.delay(NoJitter()) == 5


@pytest.mark.parametrize("jitter", [0.0, 0.1, 0.5])
def test_jitter_spreads_delays_within_bounds(jitter):
    t = Tracker(Timing(interval=10, timeout=1, jitter=jitter))
    rng = random.Random(7)
    delays = [t.delay(rng) for _ in range(500)]
    assert min(delays) >= 10 * (1 - jitter) and max(delays) <= 10 * (1 + jitter)
    if jitter:
        assert max(delays) - min(delays) > jitter * 10  # really spread, not constant
    else:
        assert set(delays) == {10}


def test_first_check_falls_within_the_first_interval_and_spreads_targets():
    rng = random.Random(1)
    firsts = [Tracker.new(Timing(interval=10, timeout=1), now=100, rng=rng).next_due
              for _ in range(200)]
    assert all(100 <= f <= 110 for f in firsts)
    assert max(firsts) - min(firsts) > 5


def test_a_seeded_tracker_keeps_the_writers_status():
    """A restarted worker seeds its trackers from the writer: no spurious transition."""
    t = Tracker.new(Timing(interval=1, timeout=1, rise=2, fall=2), now=0, rng=NoJitter(),
                    status=DOWN, since=-50)
    assert feed(t, "f") == [None]
    assert t.status == DOWN and t.since == -50
    up = Tracker.new(Timing(interval=1, timeout=1), now=0, rng=NoJitter(), status=UP)
    assert feed(up, "p") == [None]
