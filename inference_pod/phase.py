"""The pod's one phase, and the 503 each phase that takes no work answers with.

``/readyz``, the load report, ``/stats``, the ready gauge and admission all read the phase from
:meth:`.state.PodRuntime.phase`; none of them works readiness out on its own.
"""

from __future__ import annotations

import enum

from imagefleet.errors import Unavailable


class PodPhase(enum.Enum):
    LOADING = "loading"
    """The model is loading or warming up."""
    LOAD_FAILED = "load_failed"
    """The model could not be loaded; the pod stays alive (to say why) but never serves."""
    SERVING = "serving"
    """Accepting work."""
    DRAINING = "draining"
    """Stopping: finishing accepted work, refusing new work."""
    QUARANTINED = "quarantined"
    """Repeated GPU errors; refusing work until replaced."""
    STALLED = "stalled"
    """The running batch has completed no denoising step for ``--stall-after-s``: the GPU is
    presumed hung. Refusing work, and failing ``/healthz`` so that the kubelet restarts the pod;
    serving again if the batch moves on before that."""


def refusal(phase: PodPhase, detail: str | None = None) -> Unavailable | None:
    """The error a request gets in ``phase`` (None while serving); ``detail`` says why a load failed."""
    if phase is PodPhase.LOADING:
        return Unavailable("The model is still loading.", retry_after=5, code="loading")
    if phase is PodPhase.LOAD_FAILED:
        return Unavailable(f"The model failed to load: {detail}", code="load_failed")
    if phase is PodPhase.DRAINING:
        return Unavailable("The pod is draining.", retry_after=1, code="draining")
    if phase is PodPhase.QUARANTINED:
        return Unavailable("The pod is quarantined after repeated GPU errors.", code="quarantined")
    if phase is PodPhase.STALLED:
        return Unavailable(
            "The pod's GPU has stopped making progress; send the request elsewhere.", code="stalled"
        )
    return None


def refused(phase: PodPhase, detail: str | None = None) -> Unavailable:
    """The error of a phase that takes no work (ValueError for SERVING)."""
    error = refusal(phase, detail)
    if error is None:
        raise ValueError(f"a {phase.value} pod takes work")
    return error
