"""The stall watch: a running batch that completes no denoising step for too long."""

from __future__ import annotations

from dataclasses import dataclass

from imagefleet.inference_pod.health import StallWatch


@dataclass
class Run:
    started_at: float
    progress: int = 0


def test_a_batch_that_keeps_stepping_is_never_stalled_however_long_it_runs() -> None:
    watch, run = StallWatch(after_s=10), Run(started_at=0.0)
    for now in range(0, 1000, 5):
        run.progress += 1
        assert not watch.stalled(run, float(now))


def test_no_step_for_longer_than_the_limit_is_a_stall_and_a_step_ends_it() -> None:
    watch, run = StallWatch(after_s=10), Run(started_at=0.0, progress=3)
    assert not watch.stalled(run, 100.0)  # first seen mid-batch: the stall is counted from now
    assert not watch.stalled(run, 110.0)
    assert watch.stalled(run, 110.5)
    run.progress += 1
    assert not watch.stalled(run, 111.0)


def test_a_batch_first_seen_without_a_step_has_made_none_since_it_started() -> None:
    watch = StallWatch(after_s=10)
    assert watch.stalled(Run(started_at=0.0), 11.0)
    # the next batch, and an idle GPU, start afresh
    assert not watch.stalled(Run(started_at=11.0), 12.0)
    assert not watch.stalled(None, 500.0)
    assert not watch.stalled(Run(started_at=500.0, progress=1), 505.0)
