"""The batch state on its own: plain numbers in, decisions out; no event loop, no clock, no GPU."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from imagefleet.inference_pod.batching import PROBE_EVERY, CompatKey, Sample
from imagefleet.inference_pod.batchstate import BatchState, Dropped, Job, Take, Wait
from imagefleet.inference_pod.costs import CostModel

KEYS = [CompatKey.of("generate", size=(64 * (i + 1), 64), steps=4, guidance=5.0) for i in range(3)]
A, B, C = KEYS
_ids = itertools.count()


def job(key: CompatKey, n: int = 1, now: float = 0.0) -> Job:
    job_id = f"job{next(_ids)}"
    samples = [Sample(key, job_id, i, "p", None, seed=i, enqueued_at=now) for i in range(n)]
    return Job(job_id, key, samples, now)


def state(max_batch: int = 4, costs: CostModel | None = None, fill: bool = True) -> BatchState:
    return BatchState(
        max_batch_size=max_batch,
        max_wait_s=0.5,
        fill=fill,
        costs=costs or CostModel(),
    )


def test_nothing_queued_means_nothing_to_run() -> None:
    assert state().next(now=0.0, busy_fraction=0.0) is None


def test_equal_keys_go_oldest_first_fifo_within_a_key_up_to_the_limit() -> None:
    s = state(max_batch=3)
    jobs = [job(B), job(A, 2), job(B), job(A, 2)]
    for j in jobs:
        s.add(j, now=0.0)
    first = s.next(now=1.0, busy_fraction=0.0)
    assert isinstance(first, Take)
    assert [x.job_id for x in first.samples] == [jobs[0].id, jobs[2].id]
    assert s.running == first.samples and s.running_samples == 2
    s.finish()
    second = s.next(now=1.0, busy_fraction=0.0)
    assert isinstance(second, Take)
    assert [(x.job_id, x.index) for x in second.samples] == [
        (jobs[1].id, 0),
        (jobs[1].id, 1),
        (jobs[3].id, 0),
    ]
    assert s.queued_samples == 1 and s.queued_requests == 1


def test_light_load_runs_one_at_a_time_where_batching_buys_little() -> None:
    costs = CostModel()
    costs.observe(A, 1, 2.7)
    costs.observe(A, 4, 9.4)  # about 2.2 s more per image: a batch of 3 beats nobody's wait
    s = state(costs=costs, fill=False)
    s.add(job(A, 3), now=0.0)
    decision = s.next(now=0.0, busy_fraction=0.1)
    assert isinstance(decision, Take) and len(decision.samples) == 1


def test_a_burst_under_sustained_load_waits_briefly_for_its_batch_to_fill() -> None:
    costs = CostModel()
    costs.observe(A, 1, 2.0)
    costs.observe(A, 4, 5.0)
    s = state(costs=costs, fill=False)
    s.add(job(A, 2, now=10.0), now=10.0)
    decision = s.next(now=10.01, busy_fraction=1.0)
    assert isinstance(decision, Wait) and 0 < decision.seconds <= 0.05
    taken = s.next(now=10.5, busy_fraction=1.0)  # the burst has paused: run what is there
    assert isinstance(taken, Take) and len(taken.samples) == 2


def test_an_out_of_memory_cap_limits_the_batch() -> None:
    costs = CostModel()
    costs.cap(A, 2)
    s = state(costs=costs)
    s.add(job(A, 4), now=0.0)
    decision = s.next(now=0.0, busy_fraction=0.0)
    assert isinstance(decision, Take) and len(decision.samples) == 2


def test_the_batch_is_capped_where_the_measured_curve_stops_paying() -> None:
    costs = CostModel()
    costs.observe(A, 1, 1.0)
    costs.observe(A, 8, 7.0)  # t(b) = 1/7*(6 + b): per image 1.0 alone, 0.875 at 8, 0.9 at 4
    s = state(max_batch=8, costs=costs, fill=False)
    s.add(job(A, 8), now=0.0)
    decision = s.next(now=0.0, busy_fraction=1.0)
    assert isinstance(decision, Take) and len(decision.samples) == s.batch_cap(A) == 4
    assert state(max_batch=8, costs=costs, fill=True).batch_cap(A) == 8  # fill: as many as allowed


def test_an_unmeasured_curve_does_not_cap_so_it_can_be_learned() -> None:
    costs = CostModel()
    costs.observe(A, 1, 1.0)  # one size: the curve is not known yet
    s = state(max_batch=8, costs=costs, fill=False)
    assert s.batch_cap(A) == 8
    costs.observe(A, 8, 8.0)  # linear: batching buys nothing
    assert s.batch_cap(A) == 1 and s.batch_cap(B) == 1  # B borrows the shape learned on A


def test_a_curve_that_caps_the_batch_is_measured_again_one_size_larger() -> None:
    """A curve timed badly once (here: batches of 2 looked slow) must not cap the key for ever."""
    costs = CostModel()
    costs.observe(A, 1, 1.0)
    costs.observe(A, 2, 2.2)  # worse per image than alone: the cap is 1
    s = state(max_batch=4, costs=costs, fill=False)
    s.add(job(A, 64), now=0.0)
    sizes = []
    for _ in range(PROBE_EVERY):
        decision = s.next(now=0.0, busy_fraction=1.0)
        assert isinstance(decision, Take)
        sizes.append(len(decision.samples))
        s.finish()
    assert sizes == [1] * (PROBE_EVERY - 1) + [2]  # one probe of the next size
    for _ in range(4):  # the GPU really batches: 2 for 1.1 s
        costs.observe(A, 2, 1.1)
    assert s.batch_cap(A) >= 2
    decision = s.next(now=0.0, busy_fraction=1.0)
    assert isinstance(decision, Take) and len(decision.samples) >= 2


def test_no_probe_when_nothing_more_waits_than_the_cap_takes() -> None:
    costs = CostModel()
    costs.observe(A, 1, 1.0)
    costs.observe(A, 2, 2.2)
    s = state(max_batch=4, costs=costs, fill=False)
    for _ in range(2 * PROBE_EVERY):
        s.add(job(A, 1), now=0.0)
        decision = s.next(now=0.0, busy_fraction=1.0)
        assert isinstance(decision, Take) and len(decision.samples) == 1
        s.finish()


def test_a_flood_of_large_requests_does_not_starve_a_trickle_of_small_ones() -> None:
    """Fake clock and costs: 50 requests of 4 large images (a 36 s batch each, 30 minutes of work)
    queued at once, then a small request every 7 s. Each small one waits at most for the large
    batch already running, never behind the flood; the flood still gets the GPU in between."""
    big = CompatKey.of("generate", size=(2048, 2048), steps=150, guidance=5.0)
    small = CompatKey.of("generate", size=(512, 512), steps=4, guidance=5.0)
    costs = CostModel()
    for key, one, four in ((big, 10.0, 36.0), (small, 0.5, 1.4)):
        costs.observe(key, 1, one)
        costs.observe(key, 4, four)
    s = state(max_batch=4, costs=costs, fill=True)
    for _ in range(50):
        s.add(job(big, 4), now=0.0)
    now, next_small, small_waits, big_batches = 0.0, 1.0, [], 0
    while now < 900:
        while next_small <= now:
            s.add(job(small, 1, now=next_small), now=next_small)
            next_small += 7.0
        decision = s.next(now=now, busy_fraction=1.0)
        assert isinstance(decision, Take)
        batch = decision.samples
        key = batch[0].key
        if key == small:
            small_waits += [now - x.enqueued_at for x in batch]
        else:
            big_batches += 1
        now += costs.seconds(key, len(batch)) or 0.0
        s.finish()
    assert len(small_waits) > 100 and max(small_waits) <= 36.0
    assert big_batches >= 20  # about 96% of the GPU time: the small ones use little of it


def test_cancelling_drops_queued_samples_and_says_when_the_running_batch_is_orphaned() -> None:
    s = state(max_batch=4)
    running, other, queued = job(A), job(A), job(B, 3)
    for j in (running, other, queued):
        s.add(j, now=0.0)
    assert isinstance(s.next(now=0.0, busy_fraction=0.0), Take)  # running and other, together
    assert s.cancel(queued.id) == Dropped(queued=3, stop_running=False)
    assert s.cancel(running.id) == Dropped(queued=0, stop_running=False)  # other still waits for it
    assert s.cancel(other.id) == Dropped(queued=0, stop_running=True)
    assert s.cancel(other.id) is None
    assert s.queued_samples == 0 and not s.jobs


def test_removing_a_finished_job_drops_what_it_still_had_queued() -> None:
    s = state(max_batch=1)
    j = job(A, 2)
    s.add(j, now=0.0)
    s.next(now=0.0, busy_fraction=0.0)
    s.remove(j.id)
    assert s.queued_samples == 0 and j.id not in s.jobs


def test_clear_forgets_everything() -> None:
    s = state()
    jobs = [job(A), job(B)]
    for j in jobs:
        s.add(j, now=0.0)
    assert s.clear() == jobs and s.queued_samples == 0 and not s.jobs


# --- properties -----------------------------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 2), st.integers(1, 3)),
        st.tuples(st.just("cancel"), st.integers(0, 30), st.just(0)),
        st.tuples(st.just("run"), st.just(0), st.just(0)),
    ),
    max_size=40,
)


@given(ops, st.integers(1, 4))
def test_every_sample_runs_at_most_once_in_batches_of_one_key_oldest_first(
    operations: list[tuple[str, int, int]], max_batch: int
) -> None:
    s = state(max_batch=max_batch)
    added: list[Job] = []
    cancelled: set[str] = set()
    ran: list[Sample] = []
    for op, a, b in operations:
        if op == "add":
            added.append(job(KEYS[a], b))
            s.add(added[-1], now=0.0)
        elif op == "cancel" and a < len(added):
            if s.cancel(added[a].id) is not None:
                cancelled.add(added[a].id)
        elif op == "run":
            heads = {key: s.queue.head(key, 1)[0] for key in s.queue.groups()}
            decision = s.next(now=0.0, busy_fraction=0.0)
            if not heads:
                assert decision is None
                continue
            assert isinstance(decision, Take)
            batch = decision.samples
            assert 1 <= len(batch) <= max_batch
            assert batch[0] is heads[batch[0].key] and all(x.key == batch[0].key for x in batch)
            assert not {x.job_id for x in batch} & cancelled
            ran.extend(batch)
            s.finish()
    assert len({x.id for x in ran}) == len(ran)  # nothing twice
    queued = list(s.queue)
    for j in added:  # nothing lost: every sample ran, is queued, or belongs to a cancelled job
        for x in j.samples:
            assert (x in ran) + (x in queued) + (j.id in cancelled and x not in ran) == 1
    for key in KEYS:  # FIFO within a key
        order = [
            (added.index(next(j for j in added if j.id == x.job_id)), x.index) for x in ran if x.key == key
        ]
        assert order == sorted(order)


@given(
    st.lists(
        st.tuples(st.floats(0.01, 50.0), st.floats(0.0, 1.0), st.integers(1, 12)), min_size=2, max_size=3
    ),
    st.integers(1, 4),
)
def test_keys_that_keep_waiting_get_equal_gpu_time_within_one_batch_each(
    shapes: list[tuple[float, float, int]], max_batch: int
) -> None:
    """Fair queueing's bound: over any stretch in which two keys both wait throughout, the GPU
    time each was served differs by at most one batch of each (whatever the batch costs)."""
    costs = CostModel()
    for key, (per_sample, overhead, _) in zip(KEYS, shapes, strict=False):
        costs.observe(key, 1, overhead + per_sample)
        costs.observe(key, 4, overhead + 4 * per_sample)
    s = state(max_batch=max_batch, costs=costs)
    for key, (_, _, jobs) in zip(KEYS, shapes, strict=False):
        for _ in range(jobs):
            s.add(job(key, 2), now=0.0)
    served = {key: 0.0 for key in s.queue.groups()}
    largest = {key: costs.seconds(key, max_batch) or 0.0 for key in served}
    while (decision := s.next(now=10.0, busy_fraction=1.0)) is not None:  # past max_wait_s
        assert isinstance(decision, Take)
        key = decision.samples[0].key
        served[key] += costs.seconds(key, len(decision.samples)) or 0.0
        s.finish()
        waiting = s.queue.groups()
        for i, j in itertools.combinations([k for k in served if k in waiting], 2):
            assert abs(served[i] - served[j]) <= largest[i] + largest[j] + 1e-9


def test_the_fixed_policy_waits_for_a_full_batch_until_max_wait() -> None:
    costs = CostModel()
    costs.observe(A, 1, 1.0)
    costs.observe(A, 4, 4.0)  # batching buys nothing: auto and fill would not wait
    s = BatchState(max_batch_size=4, max_wait_s=0.5, fill=False, fixed=True, costs=costs)
    s.add(job(A, 1, now=0.0), now=0.0)
    decision = s.next(now=0.1, busy_fraction=0.0)
    assert isinstance(decision, Wait) and abs(decision.seconds - 0.4) < 1e-9
    s.add(job(A, 2, now=0.2), now=0.2)
    assert isinstance(s.next(now=0.2, busy_fraction=0.0), Wait)
    decision = s.next(now=0.5, busy_fraction=0.0)  # the oldest waited 500 ms: take what is there
    assert isinstance(decision, Take) and len(decision.samples) == 3
    s.finish()
    s.add(job(A, 4, now=1.0), now=1.0)
    decision = s.next(now=1.0, busy_fraction=0.0)  # full at once: no wait
    assert isinstance(decision, Take) and len(decision.samples) == 4
    s.finish()
    s.add(job(A, 1, now=2.0), now=2.0)
    s.add(job(B, 1, now=2.0), now=2.0)
    decision = s.next(now=2.0, busy_fraction=0.0)  # another shape has work: the GPU does not idle
    assert isinstance(decision, Take)
