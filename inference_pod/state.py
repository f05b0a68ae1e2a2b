"""The pod's runtime state, held in the aiohttp app under typed keys."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from aiohttp import web

from imagefleet.errors import Unavailable
from imagefleet.inference_pod.files import FileStore
from imagefleet.inference_pod.models import LoadedModel
from imagefleet.inference_pod.scheduler import Scheduler
from imagefleet.inference_pod.telemetry import PodMetrics
from imagefleet.inference_pod.worker import FaultPlan
from imagefleet.schema import Limits
from imagefleet.settings import PodSettings


@dataclass
class PodRuntime:
    settings: PodSettings
    metrics: PodMetrics
    files: FileStore
    gpu: ThreadPoolExecutor
    cpu: ThreadPoolExecutor
    faults: FaultPlan | None
    started_at: float = field(default_factory=time.time)
    model: LoadedModel | None = None
    scheduler: Scheduler | None = None
    limits: Limits | None = None
    load_error: str | None = None

    def serving(self) -> tuple[LoadedModel, Scheduler, Limits]:
        """The loaded model, its scheduler and limits; 503 while loading or after a failed load."""
        if self.model is None or self.scheduler is None or self.limits is None:
            if self.load_error:
                raise Unavailable(f"The model failed to load: {self.load_error}", code="load_failed")
            raise Unavailable("The model is still loading.", retry_after=5, code="loading")
        return self.model, self.scheduler, self.limits

    @property
    def ready(self) -> bool:
        s = self.scheduler
        return s is not None and s.ready and not s.health.quarantined and not s.draining


SETTINGS = web.AppKey("settings", PodSettings)
RUNTIME = web.AppKey("runtime", PodRuntime)
