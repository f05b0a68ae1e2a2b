"""Ejection and backoff of a failing backend."""

from __future__ import annotations

import pytest

from imagefleet.router.health import Health, backoff_delay


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff_delay(i, 1.0, 30.0) for i in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff_delay(10_000, 0.5, 8.0) == 8.0


def test_ejected_after_consecutive_failures_only() -> None:
    h = Health(eject_after=3, base_s=1.0, cap_s=30.0)
    assert not h.failed(0.0)
    assert not h.failed(0.1)
    h.succeeded()  # the run is broken
    assert not h.failed(0.2)
    assert not h.failed(0.3)
    assert h.failed(0.4)
    assert h.ejected
    assert h.probe_at == 1.4


def test_probe_waits_for_the_backoff_and_failures_double_it() -> None:
    h = Health(eject_after=1, base_s=1.0, cap_s=3.0)
    assert h.failed(10.0)
    assert not h.may_probe(10.5)
    assert h.may_probe(11.0)
    assert not h.failed(11.0)  # still out: the probe failed, not a new ejection
    assert h.probe_at == 13.0
    h.failed(13.0)
    assert h.probe_at == 16.0  # capped at 3 s
    assert h.ejected


def test_a_successful_probe_brings_it_back_and_resets_the_backoff() -> None:
    h = Health(eject_after=2, base_s=1.0, cap_s=30.0)
    h.failed(0.0)
    h.failed(0.0)
    h.failed(1.0)
    assert h.succeeded() is True
    assert not h.ejected and h.failures == 0
    h.failed(5.0)
    h.failed(5.0)
    assert h.probe_at == 6.0
    assert h.succeeded() is True
    assert h.succeeded() is False


def test_many_requests_failing_at_once_eject_once_and_do_not_lengthen_the_backoff() -> None:
    h = Health(eject_after=2, base_s=1.0, cap_s=30.0)
    ejections = [h.failed(100.0 + i * 0.001) for i in range(20)]  # a crash with 20 requests in flight
    assert ejections.count(True) == 1
    assert h.probe_at == pytest.approx(101.001)  # the first backoff, not the cap
    assert h.may_probe(101.1)


def test_the_backoff_doubles_once_per_failed_probe() -> None:
    h = Health(eject_after=1, base_s=1.0, cap_s=30.0)
    h.failed(0.0)
    outs = []
    now = 0.0
    for _ in range(4):
        now = h.probe_at
        h.failed(now)  # the probe failed
        h.failed(now + 0.01)  # and a late request failure changes nothing
        outs.append(round(h.probe_at - now, 6))
    assert outs == [2.0, 4.0, 8.0, 16.0]
