"""``imagefleet operator``: kopf with the operator's handlers.

With ``leader_election`` (the Helm chart turns it on) a replica watches from the start but
reconciles only while it holds the Lease (:mod:`.leader`); when it loses the Lease it stops and
exits with :data:`LOST_LEADERSHIP_EXIT`, so Kubernetes restarts it as a follower. Two replicas
therefore never reconcile at once, and a dead leader's Lease expires after ``lease_duration_s``
for another to take over.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os

import kopf

from imagefleet.operator.handlers import build_registry
from imagefleet.settings import OperatorSettings

LOST_LEADERSHIP_EXIT = 3


def run(settings: OperatorSettings) -> int:
    """Run until SIGTERM/SIGINT (0) or until the Lease is lost (``LOST_LEADERSHIP_EXIT``)."""
    # An asyncio.Event, set on kopf's loop (the Lease callbacks run there): a threading.Event
    # would be awaited on an executor thread that outlives a SIGTERM and blocks the exit.
    stop = asyncio.Event()
    if settings.operator_namespace is None:  # in a pod: the Downward API says where (the chart sets it)
        settings = dataclasses.replace(settings, operator_namespace=os.environ.get("POD_NAMESPACE") or None)
    registry, parts = build_registry(settings, on_lost=stop.set)
    kopf.run(
        registry=registry,
        standalone=True,
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        stop_flag=stop,
    )
    return LOST_LEADERSHIP_EXIT if parts.lost else 0
