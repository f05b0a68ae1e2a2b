"""The batch state on its own: plain numbers in, decisions out; no event loop, no clock, no GPU."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from imagefleet.inference_pod.batching import CompatKey, Sample
from imagefleet.inference_pod.batchstate import BatchState, Dropped, Job, Take, Wait
from imagefleet.inference_pod.costs import CostModel

KEYS = [CompatKey.of("generate", size=(64 * (i + 1), 64), steps=4, guidance=5.0) for i in range(3)]
A, B, C = KEYS
_ids = itertools.count()


def job(key: CompatKey, n: int = 1, now: float = 0.0) -> Job:
    job_id = f"job{next(_ids)}"
    samples = [Sample(key, job_id, i, "p", None, seed=i, enqueued_at=now) for i in range(n)]
    return Job(job_id, key, samples, now)


def state(
    max_batch: int = 4, queued: int = 16, costs: CostModel | None = None, fill: bool = True
) -> BatchState:
    return BatchState(
        max_batch_size=max_batch,
        max_queued_images=queued,
        max_wait_s=0.5,
        fill=fill,
        costs=costs or CostModel(),
    )


def test_nothing_queued_means_nothing_to_run() -> None:
    assert state().next(now=0.0, busy_fraction=0.0) is None


def test_the_oldest_key_runs_first_fifo_within_it_up_to_the_limit() -> None:
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


def test_admission_counts_samples_against_the_bound() -> None:
    s = state(queued=3)
    s.add(job(A, 2), now=0.0)
    assert s.has_room(1) and not s.has_room(2)


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
    s = state(max_batch=max_batch, queued=1000)
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
            oldest = next(iter(s.queue), None)
            decision = s.next(now=0.0, busy_fraction=0.0)
            if oldest is None:
                assert decision is None
                continue
            assert isinstance(decision, Take)
            batch = decision.samples
            assert 1 <= len(batch) <= max_batch
            assert batch[0] is oldest and all(x.key == oldest.key for x in batch)
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
