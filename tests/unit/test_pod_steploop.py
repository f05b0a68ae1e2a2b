"""Step-level batches on the event loop's side: who joins, who is dropped, what is settled.

:meth:`StepSession.between` is called directly with the reports a GPU thread would send, over a
real batch state; then the whole path (scheduler, batch loop, session, delivery) runs with a fake
step runner on a real GPU thread.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from PIL import Image

from imagefleet.errors import Unavailable
from imagefleet.inference_pod.batching import CompatKey, Sample
from imagefleet.inference_pod.batchstate import BatchState, Job
from imagefleet.inference_pod.costs import CostModel
from imagefleet.inference_pod.counters import PodCounters
from imagefleet.inference_pod.scheduler import Scheduler
from imagefleet.inference_pod.steploop import StepSession
from imagefleet.inference_pod.worker import (
    Admission,
    BatchRun,
    Left,
    Outcome,
    SampleFailed,
    StepReport,
)
from tests.conftest import FakeClock, InlineExecutor
from tests.unit.test_pod_scheduler import FakeGPU, request, seeds, settle

SMALL = CompatKey.of("generate", size=(64, 64), steps=4, guidance=5.0)
LARGE = CompatKey.of("generate", size=(96, 64), steps=4, guidance=5.0)


class Fixture:
    """A batch state with queued jobs and a session over its first batch; settled groups kept."""

    def __init__(self, max_batch_size: int = 4) -> None:
        self.clock = FakeClock()
        self.state = BatchState(max_batch_size=max_batch_size, max_wait_s=0.0, fill=True, costs=CostModel())
        self.settled: list[tuple[list[int], Outcome, dict[str, Any]]] = []
        self.accounted: list[Outcome] = []
        self.joined: list[int] = []
        self._loop = asyncio.new_event_loop()

    def add(self, key: CompatKey, *seeds: int) -> Job:
        job_id = f"job{seeds[0]}"
        samples = [Sample(key, job_id, i, "p", None, s, self.clock()) for i, s in enumerate(seeds)]
        job = Job(job_id, key, samples, self.clock())
        self.state.add(job, self.clock())
        return job

    def start(self) -> StepSession:
        take = self.state.next(self.clock(), 0.0)
        assert take is not None and not hasattr(take, "seconds")
        samples = take.samples  # type: ignore[union-attr]
        run = BatchRun(samples[0].key, samples)
        return StepSession(
            run,
            state=self.state,
            loop=self._loop,
            clock=self.clock,
            settle=lambda group, outcome, seconds: self.settled.append(
                ([s.seed for s in group.samples], outcome, dict(group.log))
            ),
            account=self.accounted.append,
            joined=lambda samples, now: self.joined.extend(s.seed for s in samples),
        )

    def close(self) -> None:
        self._loop.close()


def report(
    steps_run: int, size: int, left: list[Left] | None = None, least: int = 0, outcome: Outcome | None = None
) -> StepReport:
    return StepReport(left or [], outcome or Outcome(results=[]), steps_run, size, least)


def seeds_of(admission: Admission | None) -> tuple[list[int], list[int]] | None:
    if admission is None:
        return None
    return [s.seed for s in admission.join], [s.seed for s in admission.drop]


def test_waiting_samples_of_the_key_join_up_to_the_cap_and_finished_ones_are_settled_at_once() -> None:
    f = Fixture(max_batch_size=3)
    f.add(SMALL, 1, 2)
    session = f.start()
    assert [s.seed for s in session.members] == [1, 2] and f.joined == [1, 2]
    f.add(SMALL, 3, 4)  # arrives while the batch runs
    assert seeds_of(session.between(report(1, 2, least=1))) == ([3], [])  # room for one
    assert f.state.running_samples == 3 and f.state.queued_samples == 1
    assert session.run.steps_done == 0  # a joiner has all its steps ahead
    done = Image.new("L", (1, 1))
    finished = [Left(s, done, 4) for s in session.members[:2]]
    assert seeds_of(session.between(report(4, 3, finished, least=3))) == ([4], [])
    ((group, outcome, log),) = f.settled
    assert group == [1, 2] and outcome.results == [done, done]
    assert log == {"mode": "step", "joined_at_step": 0, "left_at_step": 4, "peak_batch": 3}
    assert [s.seed for s in session.members] == [3, 4] and f.state.queued_samples == 0
    f.close()


def test_a_member_whose_request_went_away_is_dropped_before_the_next_step() -> None:
    f = Fixture()
    f.add(SMALL, 1)
    f.add(SMALL, 2, 3)
    session = f.start()
    dropped = f.state.cancel("job2")
    assert dropped is not None and not dropped.stop_running  # job1 still runs
    assert seeds_of(session.between(report(1, 3, least=1))) == ([], [2, 3])
    ((group, outcome, log),) = f.settled
    assert group == [2, 3] and outcome.cancelled and log["left_at_step"] == 1
    assert [s.seed for s in session.members] == [1] and f.state.running_samples == 1
    f.close()


def test_the_batch_ends_once_no_member_is_left() -> None:
    f = Fixture()
    f.add(SMALL, 1)
    session = f.start()
    f.state.cancel("job1")
    assert session.between(report(2, 1, least=2)) is None
    assert not session.members and f.settled[0][1].cancelled
    f.close()


def test_the_running_key_stops_taking_samples_once_the_fair_queue_would_serve_another() -> None:
    f = Fixture()
    f.add(SMALL, 1)
    session = f.start()
    f.add(LARGE, 10)  # another shape waits: it starts at the charge the running batch started from
    f.add(SMALL, 2)
    assert seeds_of(session.between(report(1, 1, least=1))) == ([], [])
    assert f.state.queued_samples == 2
    finished = [Left(session.members[0], Image.new("L", (1, 1)), 4)]
    assert session.between(report(4, 1, finished)) is None  # drained: the next batch is the queue's
    take = f.state.next(f.clock(), 0.0)
    assert take is not None and [s.seed for s in take.samples] == [10]  # type: ignore[union-attr]
    f.close()


def test_timings_and_retries_are_accounted_and_a_failed_sample_leaves_alone() -> None:
    f = Fixture()
    f.add(SMALL, 1, 2)
    session = f.start()
    failure = SampleFailed("pipeline", "no")
    outcome = Outcome(results=[], timings=[(2, 0.4)], retried=["pipeline"])
    admission = session.between(
        report(1, 2, [Left(session.members[0], failure, 0)], least=1, outcome=outcome)
    )
    assert seeds_of(admission) == ([], [])
    assert f.accounted[-1] is outcome
    ((group, settled, _),) = f.settled
    assert group == [1] and settled.results == [failure]
    assert [s.seed for s in session.members] == [2]
    f.close()


def test_a_device_fault_fails_every_member_still_in_the_batch() -> None:
    f = Fixture()
    f.add(SMALL, 1, 2)
    session = f.start()
    error = RuntimeError("CUDA error: device lost")
    session.end(Outcome(results=[], error=error))
    ((group, outcome, _),) = f.settled
    assert group == [1, 2] and outcome.error is error
    f.close()


# --- the whole path --------------------------------------------------------------------------


class FakeSteps(FakeGPU):
    """A step runner: each sample finishes after its key's steps (image ``seed + 1`` tall);
    seeds in ``sample_failures`` fail at their first step. ``hold_at`` pauses before the
    exchange after that batch step until ``release`` is set; ``calls`` are the seeds per step."""

    def __init__(self, hold_at: int | None = None) -> None:
        super().__init__()
        self.calls: list[list[int]] = []
        self.hold_at = hold_at
        self.held = threading.Event()
        self.release = threading.Event()

    def __call__(self, run: BatchRun) -> Outcome:
        if run.session is None:
            return super().__call__(run)
        done: dict[int, int] = {}
        members: list[Sample] = []
        pending = list(run.samples)
        step = 0
        while True:
            members += pending
            done.update((s.id, 0) for s in pending)
            self.calls.append([s.seed for s in members])
            left: list[Left] = []
            for s in list(members):
                if s.seed in self.sample_failures:
                    left.append(Left(s, SampleFailed("pipeline", "no"), 0))
                    members.remove(s)
                    continue
                done[s.id] += 1
                if done[s.id] == run.key.steps:
                    left.append(Left(s, Image.new("L", (1, s.seed + 1)), done[s.id]))
                    members.remove(s)
            step += 1
            if step == self.hold_at:
                self.held.set()
                self.release.wait(5)
            admission = run.session.exchange(StepReport(left, Outcome(results=[]), step, len(members), 0))
            if admission is None:
                return Outcome(results=[])
            gone = {s.id for s in admission.drop}
            members = [s for s in members if s.id not in gone]
            pending = admission.join
            if not members and not pending:
                return Outcome(results=[])


def step_scheduler(gpu: FakeSteps, pool: ThreadPoolExecutor, counters: PodCounters) -> Scheduler:
    return Scheduler(
        run_batch=gpu,
        gpu=pool,
        cpu=InlineExecutor(),
        counters=counters,
        max_batch_size=4,
        max_queued_images=32,
        max_request_gpu_seconds=1000.0,
        max_queued_gpu_seconds=10000.0,
        max_wait_s=0.0,
        fill=True,
        quarantine_after=3,
        stall_after_s=600.0,
        clock=FakeClock(),
        stepwise=lambda key: key.task == "generate",
    )


async def until(event: threading.Event) -> None:
    while not event.is_set():
        await asyncio.sleep(0.005)


def test_a_request_joins_between_steps_and_each_is_answered_when_its_own_steps_are_done() -> None:
    async def scenario() -> None:
        gpu, counters = FakeSteps(hold_at=2), PodCounters()
        with ThreadPoolExecutor(1) as pool:
            s = step_scheduler(gpu, pool, counters)
            s.start()
            first = s.submit(request(1, n=2))  # 4 steps
            await until(gpu.held)
            late = s.submit(request(7))
            failing = s.submit(request(9))
            gpu.sample_failures.add(9)
            order: list[str] = []
            first.future.add_done_callback(lambda _: order.append("first"))
            late.future.add_done_callback(lambda _: order.append("late"))
            gpu.release.set()
            assert seeds(await first.future) == [1, 2] and seeds(await late.future) == [7]
            assert isinstance(await settle(failing), Exception)
            await s.stop()
        assert order == ["first", "late"]
        # steps 1-2 with the first two, then the joiners; the failing one left after one step
        assert gpu.calls == [[1, 2], [1, 2], [1, 2, 7, 9], [1, 2, 7], [7], [7]]
        log = s.batch_log()
        assert [(b["size"], b["status"], b["joined_at_step"], b["left_at_step"]) for b in log] == [
            (1, "partial", 2, 3),
            (2, "ok", 0, 4),
            (1, "ok", 2, 6),
        ]
        assert counters.batch_size.count == 3  # one per group of samples that left together
        assert counters.images["completed"] == 3 and counters.images["failed"] == 1

    asyncio.run(asyncio.wait_for(scenario(), timeout=10))


def test_stopping_the_pod_ends_a_running_step_level_batch() -> None:
    async def scenario() -> None:
        gpu = FakeSteps(hold_at=1)
        with ThreadPoolExecutor(1) as pool:
            s = step_scheduler(gpu, pool, PodCounters())
            s.start()
            ticket = s.submit(request(1))
            await until(gpu.held)
            await s.stop()
            gpu.release.set()
            error = await settle(ticket)
        assert isinstance(error, Unavailable)

    asyncio.run(asyncio.wait_for(scenario(), timeout=10))


def test_a_step_level_key_starts_with_every_waiting_sample_and_never_waits_to_fill() -> None:
    costs = CostModel()
    costs.observe(SMALL, 1, 1.0)
    costs.observe(SMALL, 3, 2.4)  # 20% cheaper per image: too little at light load to batch
    plain = BatchState(max_batch_size=4, max_wait_s=0.5, fill=False, costs=costs)
    stepped = BatchState(max_batch_size=4, max_wait_s=0.5, fill=False, costs=costs, stepwise=lambda k: True)
    for state in (plain, stepped):
        samples = [Sample(SMALL, "job", i, "p", None, i, 0.0) for i in range(3)]
        state.add(Job("job", SMALL, samples, 0.0), 0.0)
    took = plain.next(0.0, 0.0)
    assert took is not None and len(took.samples) == 1  # type: ignore[union-attr]
    took = stepped.next(0.0, 0.0)
    assert took is not None and len(took.samples) == 3  # type: ignore[union-attr]
