"""The pod's aiohttp application factory and its lifecycle.

The server listens at once; the model loads (and warms up) in the background on the GPU thread,
so ``/healthz`` answers during a long load while ``/readyz`` and the Images API say 503 until the
pod can serve. Once it can, the runtime's status becomes a :class:`~.state.Serving` record. On
shutdown the pod drains: it refuses new work and finishes what it accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from imagefleet.httpkit import Handler, edge_middleware, error_middleware, setup_edge
from imagefleet.httpkit import serve as serve_app
from imagefleet.inference_pod import faults, models, previews, reports, stepbatch, telemetry
from imagefleet.inference_pod.files import FileStore
from imagefleet.inference_pod.routes import setup_routes
from imagefleet.inference_pod.scheduler import Scheduler
from imagefleet.inference_pod.service import ImageService
from imagefleet.inference_pod.state import METRICS, RUNTIME, LoadFailed, PodRuntime, Serving
from imagefleet.inference_pod.warmup import WarmupFailed, warm_up
from imagefleet.schema import Limits, model_defaults
from imagefleet.settings import PodSettings

log = logging.getLogger(__name__)

_ENDPOINTS = {"/v1/images/generations": "generations", "/v1/images/edits": "edits"}


def create_app(settings: PodSettings, *, model: models.LoadedModel | None = None) -> web.Application:
    """Build the pod app. ``model`` skips loading (tests that share one loaded pipeline)."""
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[count_requests, error_middleware, edge_middleware],
    )
    setup_edge(app, settings, settings.max_body_bytes)
    rt = PodRuntime(
        settings=settings,
        files=FileStore(settings.file_ttl_s, int(settings.file_store_mb * 1024 * 1024)),
        gpu=ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu"),
        cpu=ThreadPoolExecutor(max_workers=settings.encode_workers, thread_name_prefix="encode"),
        faults=faults.FaultPlan() if settings.fault_injection else None,
    )
    app[RUNTIME] = rt
    app[METRICS] = telemetry.registry(
        telemetry.PodCollector(rt.counters, lambda: reports.gauges(rt), lambda: reports.model_labels(rt))
    )
    app.cleanup_ctx.append(functools.partial(_runtime_ctx, preloaded=model))
    app.on_shutdown.append(_drain)
    setup_routes(app, debug=rt.faults is not None)
    return app


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    endpoint = _ENDPOINTS.get(request.path)
    if endpoint is None:
        return await handler(request)
    rt = request.app[RUNTIME]
    started = rt.clock()
    response = await handler(request)  # error_middleware (inner) has turned errors into responses
    rt.counters.http[(endpoint, str(response.status))] += 1
    if response.status == 200:
        rt.counters.request_done(endpoint, rt.clock() - started)
    return response


async def _runtime_ctx(app: web.Application, preloaded: models.LoadedModel | None) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    task = asyncio.get_running_loop().create_task(bring_up(rt, preloaded), name="model-load")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    if isinstance(rt.status, Serving):
        await rt.status.scheduler.stop()
    rt.gpu.shutdown(wait=False, cancel_futures=True)
    rt.cpu.shutdown(wait=False, cancel_futures=True)


async def _drain(app: web.Application) -> None:
    rt = app[RUNTIME]
    if isinstance(rt.status, Serving):
        await rt.status.scheduler.drain(rt.settings.drain_timeout_s)


async def bring_up(rt: PodRuntime, preloaded: models.LoadedModel | None) -> None:
    """Load the model (unless given), warm up, start the scheduler, and begin serving."""
    settings = rt.settings
    try:
        if preloaded is not None:
            model = preloaded
        else:
            model = await asyncio.get_running_loop().run_in_executor(rt.gpu, models.load, settings)
        info = model.info
        defaults = model_defaults(info.defaults, settings, model=info.id, size_multiple=info.size_multiple)
    except Exception as exc:
        log.exception("Loading %s failed", settings.model)
        rt.status = LoadFailed(f"{type(exc).__name__}: {exc}"[:500])
        return
    limits = Limits.from_settings(settings, model=info.id, size_multiple=info.size_multiple)
    run_batch = functools.partial(stepbatch.execute, model)
    stepwise = stepbatch.stepwise_keys(model)
    if settings.batch_mode == "step" and stepwise is None:
        log.warning(
            "--batch-mode step needs a flow-matching text-to-image pipeline (SD3 family); %s batches per request",
            info.id,
        )
    watches = previews.Watches()
    decoder = await asyncio.get_running_loop().run_in_executor(
        rt.gpu, previews.decoder_for, info.family, model.text2img
    )
    served = previews.wrap(run_batch, previews.PreviewTap(watches, decoder, rt.cpu))
    scheduler = Scheduler.from_settings(
        settings,
        run_batch=faults.wrap(served, rt.faults) if rt.faults else served,
        gpu=rt.gpu,
        cpu=rt.cpu,
        counters=rt.counters,
        clock=rt.clock,
        stepwise=stepwise,
    )
    warmup_s = 0.0
    if settings.warmup:
        try:
            warmup_s = await warm_up(
                scheduler,
                run_batch,
                rt.gpu,
                defaults,
                settings.max_batch_size,
                sizes=settings.warmup_size_list(),
                compiled=model.acceleration.compiled_blocks > 0,
            )
        except WarmupFailed as exc:
            log.error("Not serving %s: %s", info.id, exc)
            rt.status = LoadFailed(str(exc)[:500])
            return
    scheduler.start()
    service = ImageService(
        info=info, defaults=defaults, limits=limits, scheduler=scheduler, cpu=rt.cpu, watches=watches
    )
    rt.status = Serving(
        model=model, defaults=defaults, limits=limits, scheduler=scheduler, service=service, warmup_s=warmup_s
    )
    log.info(
        "Ready: %s on %s, max batch %d, tiers %s (warm-up %.1f s)",
        info.id,
        info.device,
        settings.max_batch_size,
        ",".join(limits.tiers),
        warmup_s,
    )


async def serve(settings: PodSettings) -> None:
    """Run the pod until cancelled (SIGINT/SIGTERM handled by the CLI)."""
    app = create_app(settings)
    runner = await serve_app(app, settings.host, settings.port, shutdown_timeout=settings.shutdown_timeout_s)
    log.info("Pod listening on http://%s:%d (model %s)", settings.host, settings.port, settings.model)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
