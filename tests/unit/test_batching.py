"""Batch forming: the queue's grouping and the size/wait policy, without a GPU or a loop."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from imagefleet.inference_pod.batching import CAP_GAIN, CompatKey, Plan, Queue, Sample, curve_cap, plan
from imagefleet.inference_pod.costs import ArrivalMeter, BusyMeter, CostModel, WorkModel, fit, fit_work

A = CompatKey.of("generate", size=(64, 64), steps=4, guidance=5.0)
B = CompatKey.of("generate", size=(96, 64), steps=4, guidance=5.0)


def sample(key: CompatKey, job: str = "", t: float = 0.0) -> Sample:
    return Sample(key=key, job_id=job, index=0, prompt="p", negative_prompt=None, seed=0, enqueued_at=t)


def test_keys_are_equal_whatever_order_their_fields_come_in() -> None:
    assert CompatKey.of("generate", steps=4, guidance=5.0, size=(64, 64)) == A
    assert (A.width, A.height, A.steps, A.guidance, A.strength) == (64, 64, 4, 5.0, None)
    assert A.get("no such field") is None


def test_each_key_has_its_own_fifo_and_equal_charges_go_oldest_first() -> None:
    q = Queue()
    items = [sample(B, t=0), sample(A, t=1), sample(B, t=2), sample(A, t=3), sample(B, t=4)]
    q.add(items)
    assert list(q) == items and len(q) == 5  # iteration is oldest first across keys
    assert q.next_key() == B and q.head(B, 2) == [items[0], items[2]]
    assert q.take(B, 2, cost=1.0) == [items[0], items[2]]
    assert q.next_key() == A  # B has been charged, A not yet
    assert list(q) == [items[1], items[3], items[4]]
    assert q.groups() == {A: 2, B: 1}


def test_the_key_charged_least_runs_next_and_a_returning_key_banks_no_credit() -> None:
    q = Queue()
    q.add([sample(A, t=0), sample(A, t=0), sample(B, t=1)])
    q.take(A, 1, cost=10.0)  # A's first batch starts at virtual time 0 and costs 10
    assert q.next_key() == B  # B (charged 0) before A's second sample (charged 10)
    q.take(B, 1, cost=1.0)
    late = sample(B, t=50.0)
    q.add([late])  # B comes back: lifted to the virtual time (0, where A's batch started), not below
    assert q.next_key() == B and q.charged(B) == 1.0
    q.take(B, 1, cost=20.0)
    assert q.next_key() == A  # now B (21) has had more than A (10)


def test_remove_drops_a_jobs_samples() -> None:
    q = Queue()
    q.add([sample(A, "j"), sample(A), sample(B, "j")])
    assert len(q.remove(lambda s: s.job_id == "j")) == 2 and len(q) == 1
    assert q.groups() == {A: 1} and not q.has_other_keys(A)


def test_ahead_counts_the_samples_fair_sharing_serves_first() -> None:
    q = Queue()
    # four A samples of 2 s each arrive first, then one B sample (1 s), then a fifth A
    q.add([sample(A, f"a{i}", t=i) for i in range(4)] + [sample(B, "b", t=10), sample(A, "late", t=11)])
    size = {A: 2, B: 1}.get
    cost = {A: 2.0, B: 1.0}

    def ahead(job: str) -> int | None:
        return q.ahead(job, lambda k: size(k) or 1, lambda k, n: cost[k] * n)

    # A's first batch (a0, a1) starts first; then B (charged 0 < 4); then a2, a3; then late
    assert [ahead(j) for j in ("a0", "a1", "b", "a2", "a3", "late")] == [0, 0, 2, 3, 3, 5]
    assert ahead("nobody") is None
    q.remove(lambda s: s.job_id in ("a0", "a1", "a2"))
    assert ahead("late") == 0 and ahead("b") == 2  # late now shares a3's batch, the first


def test_ahead_foretells_the_order_take_serves_in() -> None:
    q = Queue()
    keys = [A, B, A, A, B, A, B, B, A]
    q.add([sample(k, f"j{i}", t=i) for i, k in enumerate(keys)])
    q.take(B, 1, cost=3.0)  # B has run a batch already: it owes
    predicted = {f"j{i}": q.ahead(f"j{i}", lambda k: 2, lambda k, n: float(n)) for i in range(len(keys))}
    started = 0
    actual: dict[str, int] = {}
    while (key := q.next_key()) is not None:
        batch = q.take(key, 2, cost=2.0)
        for s in batch:
            actual[s.job_id] = started
        started += len(batch)
    assert predicted == {**actual, "j1": None}  # j1 was the batch that already ran


def test_curve_cap_stops_where_larger_batches_buy_less_than_the_threshold() -> None:
    assert curve_cap(8, affine(0.0, 1.0)) == 1  # linear: batching buys nothing
    assert curve_cap(8, affine(1.0, 0.0)) == 8  # pure overhead: every extra sample is free
    # Measured on an H200 (SD3.5-class, 1024x1024, 28 steps): 2.49 s alone, 17.63 s for 8.
    h200 = affine(0.327, 2.163)
    cap = curve_cap(8, h200)
    per_image = [(h200(b) or 0) / b for b in (cap - 1, cap, 8)]
    assert per_image[1] <= per_image[2] * (1 + CAP_GAIN) < per_image[0]
    assert curve_cap(4, lambda b: None) == 4  # unknown: no cap


def test_curve_cap_follows_a_curve_that_gets_worse_past_a_size() -> None:
    measured = {1: 1.0, 2: 1.2, 3: 1.5, 4: 4.0}  # at 4 the GPU thrashes: slower per image than at 3
    assert curve_cap(4, measured.get) == 3


def affine(a: float, c: float) -> Callable[[int], float | None]:
    return lambda b: a + c * b


def decide(queued: int, curve: Callable[[int], float | None], utilisation: float, **kw: object) -> Plan:
    args: dict[str, object] = dict(
        queued=queued,
        max_batch=4,
        oldest_age_s=0.0,
        since_last_arrival_s=0.0,
        max_wait_s=0.5,
        other_keys_waiting=False,
        batch_seconds=curve,
        utilisation=utilisation,
        arrivals_per_s=0.0,
    )
    args.update(kw)
    return plan(**args)  # type: ignore[arg-type]


# SD3.5-Medium at 1024x1024 on an H100 (BASELINES.md): one image nearly fills the GPU.
DIT = affine(0.47, 2.24)
# A small UNet at 512x512: per-call overhead dominates, batching is almost free.
UNET = affine(0.45, 0.02)


def test_light_load_runs_one_at_a_time_when_batching_buys_little() -> None:
    assert decide(3, DIT, utilisation=0.3) == Plan(1)


def test_light_load_batches_when_overhead_dominates() -> None:
    assert decide(3, UNET, utilisation=0.3) == Plan(3)


def test_a_backlog_of_more_than_a_full_batch_is_sustained_load_before_the_demand_says_so() -> None:
    # a burst on an idle pod: the 30 s demand window still holds the idle time before it
    assert decide(7, DIT, utilisation=0.3) == Plan(4)
    assert decide(5, DIT, utilisation=0.3) == Plan(4)
    assert decide(4, DIT, utilisation=0.3) == Plan(1)  # one full batch: the light-load rule decides


def test_sustained_load_fills_batches_even_when_the_gain_is_small() -> None:
    assert decide(4, DIT, utilisation=1.2) == Plan(4)
    assert decide(9, DIT, utilisation=1.2) == Plan(4)


def test_a_lone_request_does_not_wait_under_light_load() -> None:
    assert decide(1, UNET, utilisation=0.1) == Plan(1)


MID = affine(1.0, 1.0)  # a batch of 4 costs 1.25 per sample against 1.5 for a batch of 2


def test_waits_for_a_burst_under_sustained_load_and_stops_when_it_pauses() -> None:
    waiting = decide(2, MID, utilisation=1.2, since_last_arrival_s=0.01)
    assert waiting.size == 2 and 0 < waiting.wait_s <= 0.05
    assert decide(2, MID, utilisation=1.2, since_last_arrival_s=0.2) == Plan(2)


def test_does_not_wait_for_company_worth_less_than_the_threshold() -> None:
    assert decide(2, DIT, utilisation=1.2, since_last_arrival_s=0.01) == Plan(2)  # 2 -> 4 buys 5%


def test_never_waits_past_max_wait_or_while_other_work_is_queued() -> None:
    assert decide(2, MID, utilisation=1.2, oldest_age_s=0.6) == Plan(2)
    assert decide(2, MID, utilisation=1.2, other_keys_waiting=True) == Plan(2)


def test_no_wait_when_a_full_batch_buys_less_than_the_threshold() -> None:
    flat = affine(0.0, 1.0)  # perfectly linear: batching buys nothing
    assert decide(2, flat, utilisation=1.2) == Plan(2)


def test_unknown_costs_batch_without_waiting() -> None:
    assert decide(3, lambda b: None, utilisation=0.0) == Plan(3)


def test_fill_policy_always_batches_as_many_as_allowed() -> None:
    assert decide(3, DIT, utilisation=0.0, fill=True) == Plan(3)


def test_fit_recovers_an_affine_curve() -> None:
    line = fit([(1, 2.715), (2, 4.957), (4, 9.391), (8, 18.476)])
    assert line is not None
    assert abs(line.c - 2.25) < 0.05 and abs(line.a - 0.45) < 0.1


def test_cost_model_prices_unseen_keys_by_work() -> None:
    costs = CostModel()
    assert costs.seconds(A, 1) is None
    costs.observe(A, 1, 1.0)
    costs.observe(A, 4, 1.6)
    assert abs((costs.seconds(A, 2) or 0) - 1.2) < 1e-6
    big = CompatKey.of("generate", size=(128, 128), steps=8, guidance=5.0)  # 8x the work of A per sample
    assert abs((costs.seconds(big, 1) or 0) - 8.0) < 1e-6
    assert costs.unit_seconds(4) > 0


def test_fit_work_tells_per_call_overhead_from_per_step_work() -> None:
    truth = WorkModel(o=0.5, a=0.02, c=0.3)
    points = [(u, b, truth.at(u, b)) for u, b in [(1.0, 1), (1.0, 2), (1.0, 4), (2.0, 1)]]
    model = fit_work(points)
    assert model is not None
    assert (model.o, model.a, model.c) == pytest.approx((0.5, 0.02, 0.3))
    assert fit_work(points[:3]) is None  # one work size: the overhead cannot be told apart
    assert fit_work([(1.0, 1, 1.0), (1.0, 2, 2.0), (2.0, 1, 2.0)]) is None  # no overhead: proportional


def test_cost_model_prices_a_larger_shape_without_scaling_the_overhead() -> None:
    costs = CostModel()
    a2 = CompatKey.of("generate", size=(64, 64), steps=8, guidance=5.0)  # twice A's work
    for key, units in ((A, 1.0), (a2, 2.0)):
        for b in (1, 4):
            costs.observe(key, b, 0.5 + units * (0.02 + 0.3 * b))  # 0.5 s per call
    big = CompatKey.of("generate", size=(128, 128), steps=8, guidance=5.0)  # 8x A's work
    assert costs.seconds(big, 1) == pytest.approx(0.5 + 8 * 0.32)  # not 8 x A's time


def test_cost_model_caps_batches_after_out_of_memory() -> None:
    costs = CostModel()
    costs.cap(A, 2)
    assert costs.max_batch(A, 8) == 2 and costs.max_batch(B, 8) == 8


def test_arrival_meter_window() -> None:
    meter = ArrivalMeter(window_s=10)
    meter.record(0.0, A, 5, solo_seconds=2.0)
    assert meter.rate(A, 0.0) == 0.5 and meter.utilisation(0.0) == 1.0
    assert meter.rate(A, 11.0) == 0.0 and meter.utilisation(11.0) == 0.0


def test_busy_meter_measures_the_share_of_the_window_spent_running() -> None:
    meter = BusyMeter(window_s=10)
    meter.start(100.0)
    meter.stop(104.0)
    meter.start(106.0)
    assert abs(meter.fraction(108.0) - 0.6) < 1e-9  # 4 s done + 2 s running, of 10
    meter.stop(115.0)
    assert abs(meter.fraction(115.0) - 0.9) < 1e-9  # the first span left the window; 9 s of the second
