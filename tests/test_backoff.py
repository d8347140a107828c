"""The one backoff of the agent's retry loops."""

from __future__ import annotations

from pyflannel.backoff import Backoff


def test_pauses_double_up_to_the_cap_and_reset_starts_again() -> None:
    b = Backoff(0.5, 3.0)
    assert [b.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    b.reset()
    assert [b.next() for _ in range(2)] == [0.5, 1.0]


def test_jitter_spreads_each_pause_within_its_fraction() -> None:
    b = Backoff(1.0, 1.0, jitter=0.1)
    got = [b.next() for _ in range(200)]
    assert all(0.9 <= x <= 1.1 for x in got)
    assert len(set(got)) > 1


def test_a_zero_first_pause_stays_zero_and_a_cap_below_first_is_first() -> None:
    assert [Backoff(0.0, 5.0).next() for _ in range(3)] == [0.0] * 3
    b = Backoff(2.0, 1.0)
    assert [b.next(), b.next()] == [2.0, 2.0]
