"""Leader election over a ``coordination.k8s.io`` Lease, through the ``kubernetes`` client.

Every replica runs kopf's watches (so a follower's view is warm), but only the replica holding the
Lease runs reconcile workers. The election runs on a daemon thread and reports on the event loop:
``on_started`` once this replica leads, ``on_stopped`` when it lost the Lease (it then stops
reconciling and the process exits, so Kubernetes restarts it as a follower).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable

from imagefleet.settings import OperatorSettings

log = logging.getLogger(__name__)


def lease_namespace(settings: OperatorSettings) -> str:
    return settings.lease_namespace or os.environ.get("POD_NAMESPACE") or "default"


def start(
    settings: OperatorSettings,
    identity: str,
    loop: asyncio.AbstractEventLoop,
    on_started: Callable[[], None],
    on_stopped: Callable[[], None],
) -> threading.Thread:
    """Campaign for the Lease on a daemon thread (the client must be configured already)."""
    from kubernetes.leaderelection import electionconfig, leaderelection
    from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

    logging.getLogger("leaderelection").setLevel(logging.WARNING)  # a line per renewal otherwise
    namespace = lease_namespace(settings)
    duration = settings.lease_duration_s

    def started() -> None:
        log.info("Leading: holding the Lease %s/%s as %s", namespace, settings.lease_name, identity)
        loop.call_soon_threadsafe(on_started)

    def stopped() -> None:
        log.warning("Lost the Lease %s/%s; stopping", namespace, settings.lease_name)
        loop.call_soon_threadsafe(on_stopped)

    config = electionconfig.Config(
        LeaseLock(settings.lease_name, namespace, identity),
        lease_duration=duration,
        renew_deadline=max(2, duration * 2 // 3),
        retry_period=max(1, duration // 8),
        onstarted_leading=started,
        onstopped_leading=stopped,
    )
    election = leaderelection.LeaderElection(config)
    thread = threading.Thread(target=election.run, name="leader-election", daemon=True)
    thread.start()
    log.info("Following: waiting for the Lease %s/%s as %s", namespace, settings.lease_name, identity)
    return thread
