"""Autoscaling from queued seconds: up at once, down only after the delay, within bounds, and a
pod that did not answer its scrape never taken for an idle one."""

from __future__ import annotations

from imagefleet.operator.autoscale import Demand, Stabilizer, recommend
from imagefleet.operator.spec import Autoscaling
from tests.unit.test_operator_faults import metrics

POLICY = Autoscaling(min_replicas=1, max_replicas=5, target_queued_seconds=30.0, scale_down_delay_s=60.0)


def test_recommendation_is_queued_work_over_target_within_bounds() -> None:
    assert [recommend(q, POLICY) for q in (0, 1, 30, 31, 95, 10_000)] == [1, 1, 1, 2, 4, 5]


def test_scale_up_is_immediate_and_scale_down_waits_for_the_whole_delay() -> None:
    s = Stabilizer()
    assert s.desired(1, Demand(120.0), POLICY, now=0.0) == 4
    assert s.desired(4, Demand(0.0), POLICY, now=10.0) == 4  # window still holds the 4
    assert s.desired(4, Demand(0.0), POLICY, now=59.0) == 4
    assert s.desired(4, Demand(0.0), POLICY, now=71.0) == 1  # the 4 left the window


def test_a_fresh_stabilizer_never_scales_down_before_one_delay() -> None:
    s = Stabilizer()
    assert s.desired(5, Demand(0.0), POLICY, now=100.0) == 5
    assert s.desired(5, Demand(0.0), POLICY, now=161.0) == 1


def test_replicas_above_max_come_down_at_once_and_below_min_go_up() -> None:
    assert Stabilizer().desired(9, Demand(0.0), POLICY, now=0.0) == 5
    assert Stabilizer().desired(0, Demand(0.0), POLICY, now=0.0) == 1


def test_a_scrape_sums_the_pods_that_answered_and_counts_those_that_did_not() -> None:
    scraped = [metrics(queued_seconds=40.0), None, metrics(queued_seconds=2.5), None]
    assert Demand.of(scraped) == Demand(seconds=42.5, unanswered=2)
    assert Demand.of([]) == Demand(0.0, 0)


def test_pods_too_busy_to_answer_are_not_scaled_away() -> None:
    """Saturated pods answer /metrics late or not at all: a whole delay of unanswered scrapes
    keeps every pod that did not answer (each holds its own place), and sheds only idle ones."""
    s = Stabilizer()
    assert s.desired(1, Demand.of([metrics(queued_seconds=120.0)]), POLICY, now=0.0) == 4
    for now in (20.0, 40.0, 61.0, 80.0):
        assert s.desired(4, Demand.of([None] * 4), POLICY, now=now) == 4
    idle_two = [None, None, metrics(), metrics()]
    assert s.desired(4, Demand.of(idle_two), POLICY, now=100.0) == 4  # the window still holds a 4
    assert s.desired(4, Demand.of(idle_two), POLICY, now=141.0) == 2


def test_pods_that_did_not_answer_add_no_replicas() -> None:
    """No scale-up without evidence: unanswered pods count as holding nothing when going up."""
    s = Stabilizer()
    assert s.desired(2, Demand.of([metrics(queued_seconds=50.0), None]), POLICY, now=0.0) == 2
    assert s.desired(2, Demand.of([metrics(queued_seconds=70.0), None]), POLICY, now=1.0) == 3


def test_the_last_answer_is_kept_for_the_status() -> None:
    s = Stabilizer()
    assert s.last is None
    s.desired(1, Demand(120.0), POLICY, now=0.0)
    s.desired(4, Demand.of([None] * 4), POLICY, now=5.0)
    assert s.last == 4
