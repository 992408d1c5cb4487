"""``tests/pace.py``, the tests' one wait: limits scale by a factor of at least 1, the configured
part does not, and a wait that runs out says what it waited for, the limit and the factor."""

from __future__ import annotations

import itertools

import pytest

from tests import pace

pytestmark = pytest.mark.timeout(60)  # the first use measures the machine


def test_the_factor_is_at_least_1_and_scales_only_the_limit():
    assert pace.factor() >= 1.0
    assert pace.limit(2.0) == 2.0 * pace.factor() >= 2.0
    assert pace.limit(0.5, fixed=1.0) == 1.0 + 0.5 * pace.factor()
    assert pace.limit(0.0, fixed=1.0) == 1.0


def test_a_wait_returns_the_first_value_the_predicate_accepts():
    calls = itertools.count(1)
    assert pace.wait_until(lambda: next(calls) >= 3 and "third", 60, "three calls",
                           every=0) == "third"
    assert pace.wait_until(lambda: {}, 60, "an empty dict", until={}.__eq__) == {}


def test_a_wait_that_runs_out_says_what_it_waited_for_the_limit_and_the_factor():
    with pytest.raises(AssertionError) as exc:
        pace.wait_until(lambda: 3, 0, lambda: "three to be four", until=(4).__eq__)
    text = str(exc.value)
    assert "for three to be four" in text and "a limit of 0 s" in text, text
    assert f"pace {pace.factor():.2f}" in text and "last: 3" in text, text


def test_an_ignored_exception_is_not_yet_and_any_other_fails_at_once():
    with pytest.raises(AssertionError, match="ZeroDivisionError"):
        pace.wait_until(lambda: 1 / 0, 0, "no error", ignoring=(ZeroDivisionError,))
    with pytest.raises(KeyError):
        pace.wait_until(lambda: {}["gone"], 60, "a key")
