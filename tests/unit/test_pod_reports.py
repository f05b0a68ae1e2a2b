"""One phase and one set of counters behind /readyz, the load report, /stats and /metrics."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import generate_latest

from imagefleet import metrics as m
from imagefleet.inference_pod import reports, telemetry
from imagefleet.inference_pod.counters import PodCounters
from imagefleet.inference_pod.files import FileStore
from imagefleet.inference_pod.models import LoadedModel, ModelInfo
from imagefleet.inference_pod.phase import PodPhase
from imagefleet.inference_pod.service import ImageService
from imagefleet.inference_pod.state import LoadFailed, PodRuntime, Serving
from imagefleet.loadreport import LoadReport
from imagefleet.schema import Defaults, Limits
from imagefleet.settings import PodSettings
from tests.conftest import InlineExecutor
from tests.unit.test_pod_scheduler import DEFAULTS, LIMITS, FakeGPU, request, scheduler

INFO = ModelInfo(
    id="m",
    family="tiny",
    source="built-in",
    random_weights=True,
    device="cpu",
    dtype="float32",
    size_multiple=8,
    defaults=DEFAULTS,
    supports_negative_prompt=True,
)


def runtime(**settings: Any) -> PodRuntime:
    return PodRuntime(
        settings=PodSettings(model="m", **settings),
        files=FileStore(60, 1 << 20),
        gpu=InlineExecutor(),  # type: ignore[arg-type]
        cpu=InlineExecutor(),  # type: ignore[arg-type]
        faults=None,
    )


def serve(rt: PodRuntime, defaults: Defaults = DEFAULTS, limits: Limits = LIMITS) -> Serving:
    s = scheduler(FakeGPU(), counters=rt.counters)
    service = ImageService(info=INFO, defaults=defaults, limits=limits, scheduler=s, cpu=rt.cpu)
    model = LoadedModel(info=INFO, text2img=None)
    rt.status = Serving(model=model, defaults=defaults, limits=limits, scheduler=s, service=service)
    return rt.status


def test_before_the_model_has_loaded_the_load_report_is_a_real_one_that_says_not_ready() -> None:
    rt = runtime()
    report = reports.load_report(rt)
    assert isinstance(report, LoadReport) and not report.accepting and report.model == "m"
    assert LoadReport.from_json(report.to_json()) == report
    assert rt.phase() is PodPhase.LOADING and reports.gauges(rt).ready == 0
    rt.status = LoadFailed("OSError: no such model")
    assert rt.phase() is PodPhase.LOAD_FAILED and not reports.load_report(rt).ready
    assert reports.pod_stats(rt)["ready"] is False and reports.model_labels(rt) is None


def test_serving_draining_and_the_reports_agree() -> None:
    async def scenario() -> None:
        rt = runtime()
        serving = serve(rt)
        serving.scheduler.start()
        ticket = serving.scheduler.submit(request(0, n=2))
        await ticket.future
        report = reports.load_report(rt)
        assert report.ready and report.completed_images == 2 and report.default_width == 64
        stats = reports.pod_stats(rt)
        assert stats["ready"] and stats["global"]["completed"] == 1 and stats["global"]["total_images"] == 2
        assert stats["devices"]["cpu"]["total_batches_processed"] == 1
        assert reports.model_entry(rt)["default_size"] == "64x64"
        await serving.scheduler.drain(1)
        assert rt.phase() is PodPhase.DRAINING
        report = reports.load_report(rt)
        assert report.draining and not report.ready and reports.gauges(rt).ready == 0
        await serving.scheduler.stop()

    asyncio.run(scenario())


def test_metrics_are_read_from_the_counters_at_scrape_time() -> None:
    counters = PodCounters()
    registry = telemetry.registry(
        telemetry.PodCollector(
            counters, lambda: telemetry.Gauges(queued_samples=3, ready=1), lambda: {"model": "m"}
        )
    )
    counters.images[m.OUTCOME_COMPLETED] += 5
    counters.other_errors["oom"] += 1
    counters.http[("generations", "200")] += 2
    counters.batch(2, 0.07)
    counters.request_done("edits", 1.5)
    scrape = m.parse(generate_latest(registry).decode())
    assert scrape.value(m.POD_IMAGES + "_total", outcome="completed") == 5
    assert scrape.value(m.POD_IMAGES + "_total", outcome="cancelled") == 0
    assert scrape.value(m.POD_ERRORS + "_total", kind="oom") == 1
    assert scrape.value(m.POD_REQUESTS + "_total", endpoint="generations", status="200") == 2
    assert scrape.value(m.POD_BATCH_SECONDS + "_bucket", le="0.05") == 0
    assert scrape.value(m.POD_BATCH_SECONDS + "_bucket", le="0.1") == 1
    assert scrape.value(m.POD_BATCH_SIZE + "_sum") == 2 and scrape.value(m.POD_BATCH_SIZE + "_count") == 1
    assert scrape.value(m.POD_REQUEST_SECONDS + "_count", endpoint="edits") == 1
    assert scrape.value(m.POD_QUEUED_SAMPLES) == 3 and scrape.value(m.POD_READY) == 1
    assert scrape.value(m.POD_MODEL_INFO + "_info", model="m") == 1
