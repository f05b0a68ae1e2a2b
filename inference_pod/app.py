"""The pod's aiohttp application factory and its lifecycle.

The server listens at once; the model loads (and warms up) in the background on the GPU thread,
so ``/healthz`` answers during a long load while ``/readyz`` and the Images API say 503 until the
pod can serve. On shutdown the pod drains: it refuses new work and finishes what it accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from imagefleet.httpkit import Handler, error_middleware
from imagefleet.inference_pod import models, worker
from imagefleet.inference_pod.batching import CompatKey, Sample
from imagefleet.inference_pod.files import FileStore
from imagefleet.inference_pod.routes import setup_routes
from imagefleet.inference_pod.scheduler import Scheduler
from imagefleet.inference_pod.state import RUNTIME, SETTINGS, PodRuntime
from imagefleet.inference_pod.telemetry import PodMetrics
from imagefleet.schema import Limits
from imagefleet.settings import PodSettings

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 25.0
_COUNTED = {"/v1/images/generations": "generations", "/v1/images/edits": "edits"}


def create_app(settings: PodSettings, *, model: models.LoadedModel | None = None) -> web.Application:
    """Build the pod app. ``model`` skips loading (tests that share one loaded pipeline)."""
    app = web.Application(
        client_max_size=settings.max_body_bytes, middlewares=[count_requests, error_middleware]
    )
    app[SETTINGS] = settings
    app[RUNTIME] = PodRuntime(
        settings=settings,
        metrics=PodMetrics(),
        files=FileStore(settings.file_ttl_s, int(settings.file_store_mb * 1024 * 1024)),
        gpu=ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu"),
        cpu=ThreadPoolExecutor(max_workers=settings.encode_workers, thread_name_prefix="encode"),
        faults=worker.FaultPlan() if settings.fault_injection else None,
        model=model,
    )
    app.cleanup_ctx.append(functools.partial(_runtime_ctx, preloaded=model))
    app.on_shutdown.append(_drain)
    setup_routes(app)
    return app


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    endpoint = _COUNTED.get(request.path)
    if endpoint is None:
        return await handler(request)
    response = await handler(request)  # error_middleware (inner) has turned errors into responses
    request.app[RUNTIME].metrics.requests.labels(endpoint, str(response.status)).inc()
    return response


async def _runtime_ctx(app: web.Application, preloaded: models.LoadedModel | None) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    task = asyncio.get_running_loop().create_task(_bring_up(rt, preloaded), name="model-load")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    if rt.scheduler is not None:
        await rt.scheduler.stop()
    rt.gpu.shutdown(wait=False, cancel_futures=True)
    rt.cpu.shutdown(wait=False, cancel_futures=True)


async def _drain(app: web.Application) -> None:
    rt = app[RUNTIME]
    if rt.scheduler is not None:
        await rt.scheduler.drain(DRAIN_TIMEOUT_S)


async def _bring_up(rt: PodRuntime, preloaded: models.LoadedModel | None) -> None:
    loop = asyncio.get_running_loop()
    settings = rt.settings
    try:
        model = (
            preloaded if preloaded is not None else await loop.run_in_executor(rt.gpu, models.load, settings)
        )
    except Exception as exc:
        log.exception("Loading %s failed", settings.model)
        rt.load_error = f"{type(exc).__name__}: {exc}"[:500]
        return
    info = model.info
    rt.model = model
    rt.limits = Limits(
        model=info.id,
        max_n=settings.max_images_per_request,
        max_pixels=settings.max_pixels,
        max_side=settings.max_side,
        size_multiple=info.size_multiple,
        max_steps=settings.max_steps,
        max_prompt_chars=settings.max_prompt_chars,
        default_width=info.default_width,
        default_height=info.default_height,
    )
    rt.metrics.model.info(
        {
            "model": info.id,
            "family": info.family,
            "random_weights": str(info.random_weights).lower(),
            "device": info.device,
            "dtype": info.dtype,
        }
    )
    scheduler = Scheduler(
        settings,
        functools.partial(worker.execute, model, faults=rt.faults),
        rt.gpu,
        rt.cpu,
        rt.metrics,
        model_id=info.id,
        default_steps=info.default_steps,
        default_width=info.default_width,
        default_height=info.default_height,
    )
    rt.metrics.bind(
        queued_samples=lambda: len(scheduler.queue),
        queued_requests=scheduler.queued_requests,
        queued_seconds=scheduler.expected_wait_seconds,
        running_samples=lambda: len(scheduler.running.samples) if scheduler.running else 0,
        quarantined=lambda: float(scheduler.health.quarantined),
        ready=lambda: float(rt.ready),
    )
    rt.scheduler = scheduler
    if settings.warmup:
        await warm_up(rt, model, scheduler)
    scheduler.start()
    scheduler.ready = True
    log.info("Ready: %s on %s, max batch %d", info.id, info.device, settings.max_batch_size)


async def warm_up(rt: PodRuntime, model: models.LoadedModel, scheduler: Scheduler) -> None:
    """Run small batches once so first requests do not pay for lazy initialisation, and time
    batch sizes 1 and max so the batcher knows from the start what batching buys."""
    info = model.info
    loop = asyncio.get_running_loop()
    steps = max(2, info.default_steps // 4)
    key = CompatKey("generate", info.default_width, info.default_height, steps, info.default_guidance)
    sizes = [1, 1] + ([rt.settings.max_batch_size] if rt.settings.max_batch_size > 1 else [])
    started = time.monotonic()
    for i, size in enumerate(sizes):
        samples = [
            Sample(
                key=key, job=None, index=j, prompt="warm-up", negative_prompt=None, seed=j, enqueued_at=0.0
            )
            for j in range(size)
        ]
        run = worker.BatchRun(key=key, samples=samples)
        outcome = await loop.run_in_executor(rt.gpu, worker.execute, model, run, None)
        if outcome.error is not None:
            log.warning("Warm-up batch of %d failed: %s", size, outcome.error)
            return
        if i > 0:  # the first run pays for lazy initialisation; do not learn from it
            for n, t in outcome.timings:
                scheduler.costs.observe(key, n, t)
        if outcome.oom_cap is not None:
            scheduler.costs.cap(key, outcome.oom_cap)
    log.info(
        "Warm-up done in %.1f s: batch 1 %.3f s, batch %d %.3f s",
        time.monotonic() - started,
        scheduler.costs.seconds(key, 1) or 0,
        sizes[-1],
        scheduler.costs.seconds(key, sizes[-1]) or 0,
    )


async def serve(settings: PodSettings) -> None:
    """Run the pod until cancelled (SIGINT/SIGTERM handled by the CLI)."""
    app = create_app(settings)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=DRAIN_TIMEOUT_S)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    log.info("Pod listening on http://%s:%d (model %s)", settings.host, settings.port, settings.model)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
