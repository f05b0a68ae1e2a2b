"""The pod's runtime: its settings and shared pieces, and where it stands (loading, failed, serving).

The model loads in the background; until it has, the runtime's status is :class:`Loading` (or
:class:`LoadFailed`, with the reason), and only then :class:`Serving`: the loaded model, its
defaults and limits, the scheduler and the image service, which exist together or not at all.
:meth:`PodRuntime.phase` is the pod's one phase.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry

from imagefleet.inference_pod.counters import PodCounters
from imagefleet.inference_pod.faults import FaultPlan
from imagefleet.inference_pod.files import FileStore
from imagefleet.inference_pod.models import LoadedModel
from imagefleet.inference_pod.phase import PodPhase, refused
from imagefleet.inference_pod.scheduler import Scheduler
from imagefleet.inference_pod.service import ImageService
from imagefleet.schema import Defaults, Limits
from imagefleet.settings import PodSettings


@dataclass(frozen=True)
class Loading:
    """The model is loading (or warming up)."""


@dataclass(frozen=True)
class LoadFailed:
    message: str


@dataclass(frozen=True)
class Serving:
    """What exists once the model has loaded."""

    model: LoadedModel
    defaults: Defaults
    """The request defaults: the model's own, overridden by the pod's settings."""
    limits: Limits
    scheduler: Scheduler
    service: ImageService
    warmup_s: float = 0.0
    """Seconds the start-up warm-up (compilation included) took before the pod turned ready."""


Status = Loading | LoadFailed | Serving


@dataclass
class PodRuntime:
    settings: PodSettings
    files: FileStore
    gpu: ThreadPoolExecutor
    cpu: ThreadPoolExecutor
    faults: FaultPlan | None
    """The fault-injection hook, when ``--fault-injection`` is on."""
    counters: PodCounters = field(default_factory=PodCounters)
    clock: Callable[[], float] = time.monotonic
    started_at: float = field(default_factory=time.time)
    status: Status = field(default_factory=Loading)

    def phase(self) -> PodPhase:
        status = self.status
        if isinstance(status, Serving):
            return status.scheduler.phase()
        return PodPhase.LOAD_FAILED if isinstance(status, LoadFailed) else PodPhase.LOADING

    def serving(self) -> Serving:
        """The serving record; 503 while loading or after a failed load."""
        status = self.status
        if isinstance(status, Serving):
            return status
        raise refused(self.phase(), status.message if isinstance(status, LoadFailed) else None)

    def service(self) -> ImageService:
        return self.serving().service


RUNTIME = web.AppKey("runtime", PodRuntime)
METRICS = web.AppKey("metrics", CollectorRegistry)
