"""The scheduler facade with a fake batch runner, an inline executor and a fake clock.

Everything but the GPU is real: the batch state, the loop, encoding (PNG, on an inline "CPU
pool"), health and the counters. The fake runner makes, for each sample, a 1-pixel-wide image
whose height is the sample's seed + 1, so every image says which request and index it was made
for. Each scenario runs on its own event loop (``asyncio.run``).
"""

from __future__ import annotations

import asyncio
import io
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from imagefleet import metrics as m
from imagefleet.errors import GenerationFailed, InvalidRequest, Overloaded, Unavailable
from imagefleet.inference_pod.batching import CompatKey, Sample
from imagefleet.inference_pod.counters import PodCounters
from imagefleet.inference_pod.delivery import Ticket
from imagefleet.inference_pod.encoding import Encoded
from imagefleet.inference_pod.faults import InjectedFault
from imagefleet.inference_pod.phase import PodPhase
from imagefleet.inference_pod.scheduler import Scheduler
from imagefleet.inference_pod.warmup import warm_up, warmup_key
from imagefleet.inference_pod.worker import BatchRun, Outcome, SampleFailed
from imagefleet.schema import Defaults, ImageRequest, Limits, parse_generation, resolve_defaults
from tests.conftest import FakeClock, InlineExecutor, ManualExecutor

T = TypeVar("T")
LIMITS = Limits(
    model="m",
    size_multiple=8,
    max_n=4,
    max_pixels=1024 * 1024,
    max_side=1024,
    max_steps=50,
    max_prompt_chars=100,
)
DEFAULTS = Defaults(size=(64, 64), steps=4, guidance=5.0)
SIZES = ("64x64", "96x64", "64x96")


class FakeGPU:
    """A batch runner: records each batch; an image per sample, ``seed + 1`` pixels tall.

    ``errors`` fail the next batches (None: that batch succeeds); a batch whose ``stop`` is set
    reports itself cancelled, as the real worker does at its next step.
    """

    def __init__(self, errors: list[BaseException | None] | None = None) -> None:
        self.batches: list[list[Sample]] = []
        self.errors: deque[BaseException | None] = deque(errors or [])
        self.sample_failures: set[int] = set()  # seeds whose sample fails alone

    def __call__(self, run: BatchRun) -> Outcome:
        n = len(run.samples)
        self.batches.append(list(run.samples))
        run.steps_total = run.steps_done = run.key.steps
        if run.stop.is_set():
            return Outcome(results=[None] * n, cancelled=True)
        error = self.errors.popleft() if self.errors else None
        if error is not None:
            return Outcome(results=[None] * n, error=error)
        results: list[Any] = [
            SampleFailed("oom", "no room")
            if s.seed in self.sample_failures
            else Image.new("L", (1, s.seed + 1))
            for s in run.samples
        ]
        return Outcome(results=results, timings=[(n, 0.01 * n)])


def request(seed: int, n: int = 1, size: str = "64x64", **fields: Any) -> ImageRequest:
    body = {"prompt": f"p{seed}", "n": n, "size": size, "seed": seed, **fields}
    return resolve_defaults(parse_generation(body, LIMITS), DEFAULTS, LIMITS)


def scheduler(
    gpu: FakeGPU, *, executor: Any = None, counters: PodCounters | None = None, **overrides: Any
) -> Scheduler:
    params: dict[str, Any] = {
        "max_batch_size": 4,
        "max_queued_images": 32,
        "max_request_gpu_seconds": 1000.0,
        "max_queued_gpu_seconds": 10000.0,
        "max_wait_s": 0.0,
        "fill": True,
        "quarantine_after": 3,
        "stall_after_s": 600.0,
    }
    params.update(overrides)
    return Scheduler(
        run_batch=gpu,
        gpu=executor or InlineExecutor(),
        cpu=InlineExecutor(),
        counters=counters if counters is not None else PodCounters(),
        clock=FakeClock(),
        **params,
    )


def seeds(images: list[Encoded]) -> list[int]:
    return [Image.open(io.BytesIO(image.data)).height - 1 for image in images]


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(scenario(), timeout=10))


async def settle(ticket: Ticket) -> list[Encoded] | BaseException:
    try:
        return await ticket.future
    except asyncio.CancelledError as exc:
        return exc
    except Exception as exc:
        return exc


async def ticks(count: int = 20) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


# --- admission ---


def test_a_full_queue_answers_429_with_the_expected_wait() -> None:
    async def scenario() -> None:
        s = scheduler(FakeGPU(), max_queued_images=3)
        s.submit(request(0, n=2))
        with pytest.raises(Overloaded) as info:
            s.submit(request(10, n=2))
        assert info.value.status == 429 and int(info.value.headers["Retry-After"]) >= 1
        s.submit(request(20, n=1))  # what fits is still accepted

    run(scenario)


def test_a_request_over_the_gpu_time_ceiling_gets_400_saying_why_and_the_ceiling() -> None:
    async def scenario() -> None:
        s = scheduler(FakeGPU(), max_request_gpu_seconds=100.0)
        big = request(0, n=4, size="1024x1024", num_inference_steps=50)  # 210 units
        with pytest.raises(InvalidRequest) as info:
            s.submit(big)  # nothing timed yet: the prior (1 s per unit) prices it at 210 s
        error = info.value
        assert error.status == 400 and error.code == "request_too_expensive"
        assert "210 s" in error.message and "at most 100 s" in error.message
        assert "4 images of 1024x1024 at 50 steps" in error.message and "before any batch" in error.message
        k = CompatKey.of("generate", **dict(big.key_values()))
        s.learn(k, Outcome(results=[], timings=[(1, 2.0), (4, 6.0)]))  # measured: 6 s for the four
        assert s.submit(big).id and s.snapshot().queued_samples == 4

    run(scenario)


def test_queued_gpu_time_is_bounded_with_429_and_retry_after_the_time_until_it_fits() -> None:
    async def scenario() -> None:
        s = scheduler(FakeGPU(), max_request_gpu_seconds=300.0, max_queued_gpu_seconds=300.0)
        one = {"size": "1024x1024", "num_inference_steps": 50}  # 52.4 units: 52.4 s by the prior
        for seed in range(5):
            s.submit(request(seed * 10, **one))
        with pytest.raises(Overloaded) as info:
            s.submit(request(50, **one))  # 262 + 52 > 300
        error = info.value
        assert error.status == 429 and error.code == "queue_full"
        assert error.headers["Retry-After"] == "15"  # 262 + 52.4 - 300 s must drain first
        assert "262 s of GPU work" in error.message and "bound of 300 s" in error.message
        s.submit(request(60, size="64x64"))  # small work still fits (0.016 s)
        assert s.snapshot().queued_samples == 6

    run(scenario)


def test_large_shapes_queued_first_do_not_hold_up_a_small_one() -> None:
    async def scenario() -> None:
        gpu, executor = FakeGPU(), ManualExecutor()
        s = scheduler(gpu, executor=executor, max_batch_size=1)
        large = [s.submit(request(i * 10, size="96x64", n=2)) for i in range(4)]
        s.start()
        await ticks()
        small = s.submit(request(100, size="64x64"))
        for _ in range(3):
            executor.run_next()
            await ticks()
        assert small.future.done() and seeds(small.future.result()) == [100]
        assert [b[0].seed for b in gpu.batches] == [0, 100, 1]  # after the running batch, not the flood
        while not all(t.done for t in large):
            executor.run_next()
            await ticks()
        await s.stop()

    run(scenario)


def test_a_draining_scheduler_refuses_new_work_and_finishes_what_it_accepted() -> None:
    async def scenario() -> None:
        s = scheduler(FakeGPU())
        ticket = s.submit(request(3))
        s.start()
        await s.drain(timeout_s=5)
        assert s.phase() is PodPhase.DRAINING and seeds(await ticket.future) == [3]
        with pytest.raises(Unavailable) as info:
            s.submit(request(4))
        assert info.value.code == "draining"
        await s.stop()

    run(scenario)


def test_a_request_must_come_with_its_defaults_resolved() -> None:
    async def scenario() -> None:
        with pytest.raises(ValueError, match="seed"):
            scheduler(FakeGPU()).submit(parse_generation({"prompt": "x", "size": "64x64"}, LIMITS))

    run(scenario)


# --- ordering and batch forming ---


def test_batches_form_by_key_oldest_first_and_each_result_reaches_its_own_request() -> None:
    async def scenario() -> None:
        gpu = FakeGPU()
        s = scheduler(gpu, max_batch_size=4)
        tickets = [
            s.submit(request(0, size="64x64")),
            s.submit(request(10, size="96x64", n=2)),
            s.submit(request(20, size="64x64", n=2)),
            s.submit(request(30, size="64x64", n=2)),
        ]
        s.start()
        results = [await t.future for t in tickets]
        assert [seeds(r) for r in results] == [[0], [10, 11], [20, 21], [30, 31]]
        assert [[x.seed for x in b] for b in gpu.batches] == [[0, 20, 21, 30], [10, 11], [31]]
        assert all(len({x.key for x in b}) == 1 for b in gpu.batches)
        snap = s.snapshot()
        assert (snap.queued_samples, snap.running_samples, snap.phase) == (0, 0, PodPhase.SERVING)
        await s.stop()

    run(scenario)


def test_the_counters_see_every_request_batch_and_image() -> None:
    async def scenario() -> PodCounters:
        counters = PodCounters()
        s = scheduler(FakeGPU(), counters=counters, max_batch_size=2)
        tickets = [s.submit(request(0, n=3)), s.submit(request(10))]
        s.start()
        for t in tickets:
            await t.future
        await s.stop()
        return counters

    counters = run(scenario)
    assert (counters.requests_accepted, counters.requests_completed, counters.requests_failed) == (2, 2, 0)
    assert counters.images[m.OUTCOME_COMPLETED] == 4 and counters.batch_size.count == 2
    assert counters.batch_size.sum == 4 and counters.queue_wait.count == 4


# --- cancellation ---


def test_a_cancelled_queued_request_never_runs() -> None:
    async def scenario() -> None:
        gpu, executor, counters = FakeGPU(), ManualExecutor(), PodCounters()
        s = scheduler(gpu, executor=executor, counters=counters, max_batch_size=1)
        first, gone = s.submit(request(0)), s.submit(request(10, n=2))
        s.start()
        await ticks()
        assert s.snapshot().running_samples == 1 and s.snapshot().queued_samples == 2
        s.cancel(gone)
        assert s.snapshot().queued_samples == 0 and gone.future.cancelled()
        executor.run_next()
        assert seeds(await first.future) == [0]
        await ticks()
        assert [[x.seed for x in b] for b in gpu.batches] == [[0]] and not executor.calls
        assert counters.images[m.OUTCOME_CANCELLED] == 2
        await s.stop()

    run(scenario)


def test_a_running_batch_whose_requests_all_left_is_stopped() -> None:
    async def scenario() -> None:
        gpu, executor = FakeGPU(), ManualExecutor()
        s = scheduler(gpu, executor=executor)
        a, b = s.submit(request(0)), s.submit(request(10))
        s.start()
        await ticks()
        s.cancel(a)
        s.cancel(b)  # now nobody waits for the batch: it stops at its next step
        executor.run_next()
        await ticks()
        assert s.batch_log()[-1]["status"] == "cancelled"
        assert a.future.cancelled() and b.future.cancelled()
        after = s.submit(request(20))
        await ticks()
        executor.run_next()
        assert seeds(await after.future) == [20]
        await s.stop()

    run(scenario)


# --- failures ---


def test_a_failed_batch_fails_its_requests_only_and_the_next_one_succeeds() -> None:
    async def scenario() -> None:
        gpu = FakeGPU(errors=[RuntimeError("boom"), None])
        s = scheduler(gpu, max_batch_size=1)
        failed, ok = s.submit(request(0)), s.submit(request(10))
        s.start()
        error = await settle(failed)
        # the client hears a generic message naming its request; the exception text stays in the log
        assert isinstance(error, GenerationFailed) and "boom" not in error.message
        assert failed.id in error.message
        assert seeds(await ok.future) == [10] and s.phase() is PodPhase.SERVING
        await s.stop()

    run(scenario)


def test_a_sample_that_fails_alone_fails_its_request_not_its_batchmates() -> None:
    async def scenario() -> None:
        gpu = FakeGPU()
        gpu.sample_failures.add(1)
        s = scheduler(gpu)
        bad, good = s.submit(request(0, n=2)), s.submit(request(10))
        s.start()
        error = await settle(bad)
        assert isinstance(error, GenerationFailed) and error.code == "oom"
        assert seeds(await good.future) == [10]
        await s.stop()

    run(scenario)


def test_repeated_failures_quarantine_and_send_queued_work_elsewhere() -> None:
    async def scenario() -> PodCounters:
        counters = PodCounters()
        gpu = FakeGPU(errors=[InjectedFault("x"), RuntimeError("not the device's"), InjectedFault("y")])
        s = scheduler(gpu, counters=counters, max_batch_size=1, quarantine_after=2)
        tickets = [s.submit(request(seed)) for seed in (0, 10, 20, 30)]
        s.start()
        outcomes = [await settle(t) for t in tickets]
        # a device fault is the GPU's, not the request's: 503, so a router retries it elsewhere;
        # a failure that is not the device's neither counts nor resets the count
        assert [type(o) for o in outcomes] == [Unavailable, GenerationFailed, Unavailable, Unavailable]
        assert isinstance(outcomes[0], Unavailable) and outcomes[0].code == "device_error"
        assert isinstance(outcomes[3], Unavailable) and outcomes[3].code == "quarantined"
        assert s.phase() is PodPhase.QUARANTINED and s.snapshot().last_error
        with pytest.raises(Unavailable):
            s.submit(request(40))
        await s.stop()
        return counters

    counters = run(scenario)
    assert (
        counters.batch_errors == {"injected": 2, "pipeline": 1} and counters.other_errors["quarantine"] == 1
    )
    assert counters.failed_batches == 3 and counters.requests_failed == 4


def test_stop_fails_what_is_still_open_with_503() -> None:
    async def scenario() -> None:
        s = scheduler(FakeGPU(), executor=ManualExecutor())
        ticket = s.submit(request(0))
        s.start()
        await ticks()
        await s.stop()
        error = await settle(ticket)
        assert isinstance(error, Unavailable) and error.status == 503

    run(scenario)


def test_the_warm_up_teaches_the_cost_model() -> None:
    async def scenario() -> None:
        s = scheduler(FakeGPU())
        k = CompatKey.of("generate", **dict(request(0).key_values()))
        assert s.estimate(k, 1) is None
        s.learn(k, Outcome(results=[], timings=[(1, 0.5), (4, 1.1)]))
        assert s.estimate(k, 1) == pytest.approx(0.5) and s.snapshot().unit_seconds > 0

    run(scenario)


def test_the_warm_up_times_the_default_shapes_curve_so_batches_are_capped_from_the_start() -> None:
    async def scenario() -> None:
        runs: list[tuple[int, int]] = []

        def overhead_bound(run: BatchRun) -> Outcome:  # 1 s per call, 0.02 s per image and step
            n = len(run.samples)
            runs.append((n, run.key.steps))
            return Outcome(results=[None] * n, timings=[(n, 1.0 + 0.02 * n * run.key.steps)])

        def linear(run: BatchRun) -> Outcome:  # batching buys nothing
            n = len(run.samples)
            return Outcome(results=[None] * n, timings=[(n, 0.25 * n * run.key.steps)])

        served = CompatKey.of("generate", **dict(request(0).key_values()))  # 64x64, 4 steps
        for runner, cap in ((overhead_bound, 8), (linear, 1)):
            s = scheduler(FakeGPU(), max_batch_size=8, fill=False)
            await warm_up(s, runner, InlineExecutor(), DEFAULTS, max_batch_size=8)
            assert s._state.batch_cap(warmup_key(DEFAULTS)) == cap and s._state.batch_cap(served) == cap
        # Each timed batch size runs once first (its first call pays for set-up) and is not
        # learned; the last, at twice the steps, tells the 1 s per call from the per-step work, so
        # a longer request is priced right.
        assert runs == [(1, 2), (4, 2), (8, 2), (1, 2), (4, 2), (8, 2), (1, 4)]
        s = scheduler(FakeGPU(), max_batch_size=8, fill=False)
        await warm_up(s, overhead_bound, InlineExecutor(), DEFAULTS, max_batch_size=8)
        long = CompatKey.of("generate", size=(64, 64), steps=40, guidance=5.0)
        assert s.estimate(long, 1) == pytest.approx(1.0 + 0.02 * 40)

    run(scenario)


def test_the_warm_up_learns_no_first_call_at_a_batch_size() -> None:
    """An eager pipeline's first call at a batch size pays for set-up (memory, kernel choices), and a
    default size that is not a compiled warm-up size compiles there: the curve must not hold it."""

    async def scenario() -> None:
        seen: set[tuple[int, int, int]] = set()

        def first_calls_dear(run: BatchRun) -> Outcome:  # 0.05 s per image and step; +5 s once per shape
            n = len(run.samples)
            shape = (run.key.width, run.key.height, n)
            setup = 0.0 if shape in seen else 5.0
            seen.add(shape)
            return Outcome(results=[None] * n, timings=[(n, setup + 0.05 * n * run.key.steps)])

        key = warmup_key(DEFAULTS)
        for compiled, sizes in ((False, None), (True, [(128, 128)])):
            seen.clear()
            s = scheduler(FakeGPU(), max_batch_size=4, fill=False)
            await warm_up(
                s,
                first_calls_dear,
                InlineExecutor(),
                DEFAULTS,
                max_batch_size=4,
                sizes=sizes,
                compiled=compiled,
            )
            for n in (1, 2, 4):
                assert s.estimate(key, n) == pytest.approx(0.05 * n * key.steps)

    run(scenario)


# --- properties ---

plans = st.lists(
    st.tuples(
        st.integers(1, 3), st.sampled_from(SIZES), st.booleans(), st.booleans()
    ),  # n, size, cancel, fail
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans, st.integers(1, 4))
def test_no_sample_is_lost_or_duplicated_and_each_result_reaches_its_request(
    plan: list[tuple[int, str, bool, bool]], max_batch: int
) -> None:
    async def scenario() -> None:
        gpu = FakeGPU()
        s = scheduler(gpu, max_batch_size=max_batch, quarantine_after=1000)
        failing = {i * 10 for i, (_, _, _, fail) in enumerate(plan) if fail}
        gpu.sample_failures = failing
        tickets = [s.submit(request(i * 10, n=n, size=size)) for i, (n, size, _, _) in enumerate(plan)]
        for ticket, (_, _, cancel, _) in zip(tickets, plan, strict=True):
            if cancel:
                s.cancel(ticket)
        s.start()
        outcomes = [await settle(t) for t in tickets]
        ran = [x for batch in gpu.batches for x in batch]
        assert len({x.id for x in ran}) == len(ran)  # no sample twice
        assert all(len(b) <= max_batch and len({x.key for x in b}) == 1 for b in gpu.batches)
        for i, ((n, _, cancel, _), outcome) in enumerate(zip(plan, outcomes, strict=True)):
            own = [x for x in ran if x.seed // 10 == i]
            if cancel:
                assert isinstance(outcome, asyncio.CancelledError) and not own
            elif i * 10 in failing:
                assert isinstance(outcome, GenerationFailed)
            else:
                assert isinstance(outcome, list) and seeds(outcome) == [i * 10 + k for k in range(n)]
                assert sorted(x.seed for x in own) == [i * 10 + k for k in range(n)]  # every sample ran once
        assert s.snapshot().queued_samples == 0
        await s.stop()

    run(scenario)


events = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.integers(1, 3), st.sampled_from(SIZES)),
        st.tuples(st.just("cancel"), st.integers(0, 20), st.just("")),
        st.tuples(st.just("gpu"), st.just(0), st.just("")),  # the running batch finishes
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events, st.integers(1, 4), st.booleans())
def test_under_random_arrivals_and_cancellations_nothing_is_lost_duplicated_or_leaked(
    script: list[tuple[str, int, str]], max_batch: int, fill: bool
) -> None:
    """Requests arrive, leave (queued or running) and batches finish in any order: each sample runs
    at most once, every request that stayed gets exactly its own images, and once everything is
    settled nothing is left queued, running or counted twice."""

    async def scenario() -> None:
        gpu, executor, counters = FakeGPU(), ManualExecutor(), PodCounters()
        s = scheduler(gpu, executor=executor, counters=counters, max_batch_size=max_batch, fill=fill)
        s.start()
        tickets: list[Ticket] = []
        cancelled: set[int] = set()
        for op, a, size in script:
            if op == "submit":
                tickets.append(s.submit(request(len(tickets) * 10, n=a, size=size)))
            elif op == "cancel" and a < len(tickets) and not tickets[a].done:
                s.cancel(tickets[a])
                cancelled.add(a)
            elif op == "gpu" and executor.calls:
                executor.run_next()
            await ticks()
        while executor.calls or not all(t.done for t in tickets):
            assert executor.calls, "a request is open but nothing runs"
            executor.run_next()
            await ticks()
        ran = [x for batch in gpu.batches for x in batch]
        assert len({x.id for x in ran}) == len(ran)  # no sample twice
        assert all(len(b) <= max_batch and len({x.key for x in b}) == 1 for b in gpu.batches)
        total = 0
        for i, ticket in enumerate(tickets):
            n = ticket.request.n
            total += n
            outcome = await settle(ticket)
            if i in cancelled:
                assert isinstance(outcome, asyncio.CancelledError)
            else:
                assert isinstance(outcome, list) and seeds(outcome) == [i * 10 + k for k in range(n)]
        snap = s.snapshot()
        assert (snap.queued_samples, snap.queued_requests, snap.running_samples) == (0, 0, 0)
        images = counters.images
        assert images[m.OUTCOME_COMPLETED] + images[m.OUTCOME_CANCELLED] == total  # each counted once
        await s.stop()

    run(scenario)
