"""Autoscaling from queued seconds: up at once, down only after the delay, within bounds."""

from __future__ import annotations

from imagefleet.operator.autoscale import Stabilizer, recommend
from imagefleet.operator.spec import Autoscaling

POLICY = Autoscaling(min_replicas=1, max_replicas=5, target_queued_seconds=30.0, scale_down_delay_s=60.0)


def test_recommendation_is_queued_work_over_target_within_bounds() -> None:
    assert [recommend(q, POLICY) for q in (0, 1, 30, 31, 95, 10_000)] == [1, 1, 1, 2, 4, 5]


def test_scale_up_is_immediate_and_scale_down_waits_for_the_whole_delay() -> None:
    s = Stabilizer()
    assert s.desired(1, 120.0, POLICY, now=0.0) == 4
    assert s.desired(4, 0.0, POLICY, now=10.0) == 4  # window still holds the 4
    assert s.desired(4, 0.0, POLICY, now=59.0) == 4
    assert s.desired(4, 0.0, POLICY, now=71.0) == 1  # the 4 left the window


def test_a_fresh_stabilizer_never_scales_down_before_one_delay() -> None:
    s = Stabilizer()
    assert s.desired(5, 0.0, POLICY, now=100.0) == 5
    assert s.desired(5, 0.0, POLICY, now=161.0) == 1


def test_replicas_above_max_come_down_at_once_and_below_min_go_up() -> None:
    assert Stabilizer().desired(9, 0.0, POLICY, now=0.0) == 5
    assert Stabilizer().desired(0, 0.0, POLICY, now=0.0) == 1
