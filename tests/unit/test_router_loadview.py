"""The load view: last report plus the router's own in-flight work, priced in GPU seconds."""

from __future__ import annotations

import random

import pytest

from imagefleet.loadreport import LoadReport
from imagefleet.router.cost import FREE, Shape
from imagefleet.router.discovery import Backend, static_backends
from imagefleet.router.loadview import NOMINAL_UNIT_SECONDS, LoadView
from imagefleet.router.pick import least_wait


def report(**fields: object) -> LoadReport:
    base: dict[str, object] = dict(
        model="m", ready=True, unit_seconds=2.0, default_steps=10, default_width=1000, default_height=1000
    )
    return LoadReport(**{**base, **fields})  # type: ignore[arg-type]


def make_view(*names: str) -> LoadView:
    view = LoadView(eject_after=2, backoff_s=1.0, backoff_max_s=30.0)
    view.sync({n: Backend(n, f"http://{n}:8001") for n in names})
    return view


def test_a_request_is_priced_with_the_pods_unit_cost_and_defaults() -> None:
    view = make_view("a")
    a = view.views["a"]
    view.reported(a, report(), started=0.0, now=0.1)
    assert a.price(Shape(), 1.0) == pytest.approx(10 * 1.0 * 2.0)  # 10 steps x 1 MP x 2 s/unit
    assert a.price(Shape(n=2, width=500, height=500, steps=4), 1.0) == pytest.approx(2 * 4 * 0.25 * 2.0)
    assert a.price(Shape(strength=0.5), 1.0) == pytest.approx(10.0)
    assert a.price(FREE, 1.0) == 0.0


def test_requests_sent_after_the_fetch_began_are_added_to_the_report() -> None:
    view = make_view("a")
    a = view.views["a"]
    early = view.begin(a, Shape(), now=1.0)  # sent before the fetch: the pod has it in its report
    view.reported(a, report(queued_seconds=5.0, running_remaining_seconds=1.0), started=2.0, now=2.5)
    late = view.begin(a, Shape(steps=5), now=2.2)  # sent while the fetch was in flight: not in it
    assert a.expected_wait(1.0) == pytest.approx(6.0 + 5 * 2.0)
    view.end(a, late)
    assert a.expected_wait(1.0) == pytest.approx(6.0)
    view.end(a, early)
    assert a.expected_wait(1.0) == pytest.approx(6.0)


def test_a_newer_report_absorbs_what_was_in_flight() -> None:
    view = make_view("a")
    a = view.views["a"]
    view.reported(a, report(), started=0.0, now=0.0)
    view.begin(a, Shape(), now=1.0)
    assert a.expected_wait(1.0) == pytest.approx(20.0)
    view.reported(a, report(queued_seconds=20.0), started=1.5, now=1.6)
    assert a.expected_wait(1.0) == pytest.approx(20.0)  # counted once, by the pod


def test_unmeasured_pods_are_priced_with_what_others_measured_or_a_nominal_cost() -> None:
    view = make_view("a", "b")
    a, b = view.views["a"], view.views["b"]
    view.reported(a, report(unit_seconds=0.0), 0.0, 0.0)
    view.reported(b, report(unit_seconds=0.0), 0.0, 0.0)
    assert view.fallback_unit_seconds() == NOMINAL_UNIT_SECONDS
    view.reported(b, report(unit_seconds=4.0), 0.0, 0.0)
    assert view.fallback_unit_seconds() == 4.0
    view.begin(a, Shape(), now=1.0)
    (ca,) = [c for c in view.candidates(Shape()) if c.name == "a"]
    assert ca.wait_s == pytest.approx(10 * 4.0)


def test_in_flight_counts_spread_a_burst_even_before_any_cost_is_known() -> None:
    view = make_view("a", "b", "c")
    for v in view.views.values():
        view.reported(v, report(unit_seconds=0.0), 0.0, 0.0)
    rng = random.Random(0)
    for i in range(9):
        chosen = least_wait(view.candidates(Shape()), rng)
        view.begin(view.views[chosen.name], Shape(), now=1.0 + i)
    assert sorted(len(v.inflight) for v in view.views.values()) == [3, 3, 3]


@pytest.mark.parametrize("state", [dict(ready=False), dict(quarantined=True), dict(draining=True)])
def test_pods_that_cannot_take_work_are_not_candidates(state: dict[str, bool]) -> None:
    view = make_view("a", "b")
    view.reported(view.views["a"], report(**state), 0.0, 0.0)
    view.reported(view.views["b"], report(queued_seconds=100.0), 0.0, 0.0)
    assert [c.name for c in view.candidates(Shape())] == ["b"]


def test_a_backend_without_a_report_or_ejected_is_not_a_candidate() -> None:
    view = make_view("a", "b", "c")
    view.reported(view.views["b"], report(), 0.0, 0.0)
    view.reported(view.views["c"], report(), 0.0, 0.0)
    view.views["c"].health.failed(1.0)
    view.views["c"].health.failed(1.0)
    assert [c.name for c in view.candidates(Shape())] == ["b"]
    assert view.ready_count() == 1
    assert view.healthy_count() == 2


def test_a_503_takes_the_pod_out_until_its_next_report() -> None:
    view = make_view("a")
    a = view.views["a"]
    view.reported(a, report(), 0.0, 0.0)
    view.refused(a)
    assert view.candidates(Shape()) == []
    view.reported(a, report(), 1.0, 1.0)
    assert [c.name for c in view.candidates(Shape())] == ["a"]


def test_exclude_skips_backends_already_tried() -> None:
    view = make_view("a", "b")
    for v in view.views.values():
        view.reported(v, report(), 0.0, 0.0)
    assert [c.name for c in view.candidates(Shape(), exclude={"a"})] == ["b"]


def test_sync_keeps_state_of_unchanged_backends_and_replaces_moved_ones() -> None:
    view = LoadView(eject_after=2, backoff_s=1.0, backoff_max_s=30.0)
    added, removed = view.sync(static_backends(["http://p1:1", "http://p2:1"]))
    assert len(added) == 2 and not removed
    p1 = view.views["http://p1:1"]
    view.begin(p1, Shape(), 0.0)
    added, removed = view.sync({"http://p1:1": p1.backend, "x": Backend("x", "http://p3:1")})
    assert [v.name for v in added] == ["x"] and [v.name for v in removed] == ["http://p2:1"]
    assert view.views["http://p1:1"] is p1 and len(p1.inflight) == 1
    added, removed = view.sync({"x": Backend("x", "http://p4:1")})  # same pod name, new address
    assert [v.backend.url for v in added] == ["http://p4:1"]
    assert {v.backend.url for v in removed} == {"http://p1:1", "http://p3:1"}


def test_backends_are_found_by_their_file_key() -> None:
    view = make_view("a", "b")
    b = view.views["b"]
    assert view.by_key(b.backend.key) is b
    assert view.by_key("0000000000") is None
