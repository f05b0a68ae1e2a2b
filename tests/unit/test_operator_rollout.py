"""Pod plans: missing slots, scale down, surge-first rollouts, one at a time when no GPU is free."""

from __future__ import annotations

import dataclasses

from imagefleet.operator.podview import PodView
from imagefleet.operator.rollout import Plan, plan

NEW, OLD = "new", "old"


def pod(
    slot: int, digest: str = NEW, *, ready: bool = True, terminating: bool = False, **kw: object
) -> PodView:
    base = PodView(
        name=f"g-{digest}-{slot}",
        namespace="ns",
        uid=f"uid-{digest}-{slot}",
        generator="g",
        slot=slot,
        template_hash=digest,
        phase="Running",
        ip="127.1.0.2",
        node="n",
        created_at=0.0,
        terminating=terminating,
        ready=ready,
        ready_changed_at=None,
        started=True,
        restarts=0,
        waiting_reason=None,
        unschedulable=None,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def name_of(slot: int) -> str:
    return f"g-{NEW}-{slot}"


def deleted(p: Plan) -> list[str]:
    return sorted(d.pod.name for d in p.delete)


def test_a_new_generator_gets_every_slot_at_once() -> None:
    p = plan(3, NEW, [], name_of)
    assert p.create == [0, 1, 2] and not p.delete and not p.rolling


def test_a_settled_generator_needs_nothing() -> None:
    assert plan(2, NEW, [pod(0), pod(1)], name_of).empty


def test_scale_down_deletes_the_highest_slots() -> None:
    p = plan(1, NEW, [pod(0), pod(1), pod(2)], name_of)
    assert deleted(p) == ["g-new-1", "g-new-2"] and not p.create
    assert {d.reason for d in p.delete} == {"ScaleDown"}


def test_a_slot_whose_pod_is_still_terminating_waits_for_the_name() -> None:
    p = plan(2, NEW, [pod(0), pod(1, terminating=True, ready=False)], name_of)
    assert p.empty


def test_a_rollout_surges_one_slot_and_keeps_the_old_pods_serving() -> None:
    p = plan(3, NEW, [pod(0, OLD), pod(1, OLD), pod(2, OLD)], name_of)
    assert p.create == [0] and not p.delete and p.rolling


def test_the_old_pod_goes_once_its_replacement_is_ready_and_the_next_slot_starts() -> None:
    pods = [pod(0, OLD), pod(0, NEW), pod(1, OLD), pod(2, OLD)]
    p = plan(3, NEW, pods, name_of)
    assert deleted(p) == ["g-old-0"]
    assert p.create == [1]


def test_only_one_slot_is_in_flight_while_its_new_pod_loads() -> None:
    pods = [pod(0, OLD), pod(0, NEW, ready=False), pod(1, OLD), pod(2, OLD)]
    assert plan(3, NEW, pods, name_of).empty


def test_no_free_gpu_for_the_surged_pod_makes_room_one_at_a_time() -> None:
    starving = pod(
        0,
        NEW,
        ready=False,
        phase="Pending",
        started=False,
        unschedulable="0/1 nodes: Insufficient nvidia.com/gpu",
    )
    pods = [pod(0, OLD), starving, pod(1, OLD), pod(2, OLD)]
    p = plan(3, NEW, pods, name_of)
    assert deleted(p) == ["g-old-0"] and not p.create


def test_making_room_never_takes_a_second_pod_out_of_service() -> None:
    starving = pod(
        0, NEW, ready=False, phase="Pending", started=False, unschedulable="Insufficient nvidia.com/gpu"
    )
    pods = [pod(0, OLD), starving, pod(1, OLD, ready=False), pod(2, OLD)]
    p = plan(3, NEW, pods, name_of)
    # slot 1 is already unavailable: deleting slot 0's serving pod would leave one of three
    assert "g-old-0" not in deleted(p)


def test_out_of_date_pods_that_do_not_serve_are_replaced_at_once() -> None:
    p = plan(2, NEW, [pod(0, OLD, ready=False), pod(1, OLD, ready=False)], name_of)
    assert deleted(p) == ["g-old-0", "g-old-1"]
    assert p.create == [0, 1]  # nothing serves: no reason to wait (a new pod takes a GPU as one frees)
