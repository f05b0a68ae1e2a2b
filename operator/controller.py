"""The reconcile loop: one worker task per ImageGenerator, fed by the watches kopf runs.

kopf delivers every event of ImageGenerators, of the inference pods and of the router
Deployments to :class:`Controller`, which keeps the latest of each in memory and wakes the
owning generator's :class:`Worker`. A worker runs one *pass* at a time, level-based: read the
spec, apply the shared objects, plan pods (:mod:`.rollout`, :mod:`.faults`), create and delete,
and every ``status_interval_s`` scrape the pods, autoscale and write the status. A pass that
fails is logged and retried with backoff; nothing a pass decides depends on a previous pass
having finished, so an operator killed mid-way converges when it comes back.

No finalizer is put on ImageGenerators: deleting one needs no operator (the garbage collector
removes what it owns through ownerReferences).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from imagefleet import wire
from imagefleet.operator import autoscale, faults, manifests, rollout, status
from imagefleet.operator.kube import Kube, unreachable
from imagefleet.operator.podview import PodView, pod_view
from imagefleet.operator.scrape import PodMetrics, Scraper
from imagefleet.operator.spec import GeneratorSpec, InvalidSpec, parse
from imagefleet.operator.telemetry import OperatorMetrics
from imagefleet.settings import OperatorSettings

log = logging.getLogger(__name__)

Key = tuple[str, str]
"""(namespace, name) of an ImageGenerator."""

DEBOUNCE_S = 0.2
"""A burst of watch events (a rollout, a scale) wakes a worker once."""
RETRY_MIN_S = 1.0
RETRY_MAX_S = 60.0


@dataclass
class RouterState:
    replicas: int = 0
    ready: int = 0


@dataclass
class Memory:
    """What a worker remembers between passes (lost on restart, rebuilt from observation)."""

    applied: dict[str, str] = field(default_factory=dict)
    """Object (kind/name) -> hash of the manifest last applied."""
    applied_at: float = 0.0
    metrics: dict[str, PodMetrics | None] = field(default_factory=dict)
    previous_metrics: dict[str, PodMetrics] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    """Pod uid -> completed images at the last scrape."""
    scraped_at: float = 0.0
    images_per_minute: float = 0.0
    ever_ready: set[str] = field(default_factory=set)
    written: dict[str, Any] | None = None
    stabilizer: autoscale.Stabilizer = field(default_factory=autoscale.Stabilizer)
    last_scale_time: str | None = None
    replacing: list[faults.Replacement] = field(default_factory=list)


class Controller:
    """Every generator this operator runs: their latest objects and one worker each."""

    def __init__(
        self,
        settings: OperatorSettings,
        kube: Kube,
        scraper: Scraper,
        metrics: OperatorMetrics,
        clock: Callable[[], float] = time.time,
        *,
        active: bool = True,
    ) -> None:
        self.settings = settings
        self.active = active
        """Whether workers run: False on a follower (leader election), which only watches."""
        self.kube = kube
        self.scraper = scraper
        self.metrics = metrics
        self.clock = clock
        self.generators: dict[Key, dict[str, Any]] = {}
        self.pods: dict[Key, dict[str, PodView]] = {}
        self.routers: dict[Key, RouterState] = {}
        self.workers: dict[Key, Worker] = {}
        self.stopping = False

    # --- watch events (called by the kopf handlers, on the loop) ---------------------------------

    def on_generator(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        if event_type == "DELETED":
            self.generators.pop(key, None)
            worker = self.workers.pop(key, None)
            if worker is not None:
                worker.stop()
            return
        self.generators[key] = dict(body)
        if self.stopping or not self.active:
            return
        worker = self.workers.get(key)
        if worker is None or worker.uid != meta.get("uid"):
            if worker is not None:
                worker.stop()
            worker = Worker(self, key, str(meta.get("uid")))
            self.workers[key] = worker
            worker.start()
        worker.wake()

    def on_pod(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        view = pod_view(body)
        if view is None:
            return
        pods = self.pods.setdefault(view.key, {})
        if event_type == "DELETED":
            pods.pop(view.name, None)
        else:
            pods[view.name] = view
        worker = self.workers.get(view.key)
        if worker is not None:
            worker.wake()

    def on_router(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        generator = (meta.get("labels") or {}).get(wire.LABEL_GENERATOR)
        if not generator:
            return
        key = (str(meta.get("namespace")), str(generator))
        if event_type == "DELETED":
            self.routers.pop(key, None)
        else:
            st = body.get("status") or {}
            self.routers[key] = RouterState(
                replicas=int(st.get("replicas") or 0), ready=int(st.get("readyReplicas") or 0)
            )
        worker = self.workers.get(key)
        if worker is not None:
            worker.wake()

    def activate(self) -> None:
        """Start reconciling (this replica now holds the Lease): a worker per known generator."""
        if self.active or self.stopping:
            return
        self.active = True
        for body in list(self.generators.values()):
            self.on_generator("ADDED", body)

    async def stop(self) -> None:
        self.stopping = True
        workers = list(self.workers.values())
        self.workers.clear()
        for w in workers:
            w.stop()
        for w in workers:
            await w.join()


class Worker:
    """The reconcile loop of one ImageGenerator."""

    def __init__(self, controller: Controller, key: Key, uid: str) -> None:
        self.c = controller
        self.key = key
        self.uid = uid
        self.memory = Memory()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._primed = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"generator {self.key}")

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def join(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                started = time.monotonic()
                await self.reconcile()
                self.c.metrics.passes.labels("ok").inc()
                self.c.metrics.pass_seconds.observe(time.monotonic() - started)
                failures = 0
                delay = self._until_status()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                self.c.metrics.passes.labels("error").inc()
                delay = min(RETRY_MAX_S, RETRY_MIN_S * 2 ** min(failures - 1, 10))
                down = unreachable(exc)
                if _namespace_closing(exc):  # its deletion will reach us as a DELETED event
                    log.info("Namespace %s is being deleted; %s waits for that", *self.key)
                elif down is not None:  # an outage: one line per pass, not a traceback each time
                    log.warning("Reconciling %s/%s failed: %s; retrying in %.0f s", *self.key, down, delay)
                else:
                    log.exception("Reconciling %s/%s failed; retrying in %.0f s", *self.key, delay)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
                await asyncio.sleep(DEBOUNCE_S)

    def _until_status(self) -> float:
        due = self.memory.scraped_at + self.c.settings.status_interval_s
        return max(0.05, due - self.c.clock())

    # --- one pass -------------------------------------------------------------------------------

    async def reconcile(self) -> None:
        body = self.c.generators.get(self.key)
        if body is None:
            return
        ns, name = self.key
        if not self._primed:  # the watch may not have delivered every pod yet: read them once
            items = await self.c.kube.list_pods(ns, wire.selector_string(wire.pod_selector(name)))
            known = self.c.pods.setdefault(self.key, {})
            for item in items:
                view = pod_view(item)
                if view is not None:
                    known.setdefault(view.name, view)
            self._primed = True
        try:
            g = parse(body, self.c.settings)
        except InvalidSpec as exc:
            await self._write_invalid(body, str(exc))
            return
        await self._apply_shared(g)
        current = manifests.template_hash(g, self.c.settings)
        pods = list(self.c.pods.get(self.key, {}).values())
        now = self.c.clock()
        for p in pods:
            if p.ready:
                self.memory.ever_ready.add(p.uid)

        scrape_due = now >= self.memory.scraped_at + self.c.settings.status_interval_s
        if scrape_due:
            await self._scrape(pods, now)
        verdict = faults.judge(
            pods,
            self.memory.metrics,
            self.memory.previous_metrics,
            self.memory.ever_ready,
            g.health,
            now=now,
            gpu_resource=g.gpu_resource,
            crash_loop_restarts=self.c.settings.crash_loop_restarts,
            max_replacements=self.c.settings.max_unavailable_replacements,
        )
        if scrape_due:
            self.memory.previous_metrics = {k: v for k, v in self.memory.metrics.items() if v is not None}
        await self._replace(g, verdict.replace)
        replaced = {r.pod.name for r in verdict.replace}
        alive = [p for p in pods if p.name not in replaced]
        plan = rollout.plan(g.replicas, current, alive, lambda slot: manifests.pod_name(g, current, slot))
        await self._execute(g, plan)
        if scrape_due:
            await self._autoscale(g, body)
        await self._write_status(g, body, current, verdict, now)

    async def _apply_shared(self, g: GeneratorSpec) -> None:
        now = self.c.clock()
        resync = now - self.memory.applied_at > self.c.settings.resync_s
        for manifest in manifests.shared_objects(g, self.c.settings):
            ident = f"{manifest['kind']}/{manifest['metadata']['name']}"
            digest = manifests.stable_hash(manifest)
            if not resync and self.memory.applied.get(ident) == digest:
                continue
            await self.c.kube.apply(manifest)
            self.memory.applied[ident] = digest
        if resync:
            self.memory.applied_at = now

    async def _scrape(self, pods: list[PodView], now: float) -> None:
        targets = {
            p.name: (p.ip, self.c.settings.pod_port)
            for p in pods
            if p.ip and p.phase == "Running" and not p.terminating
        }
        started = time.monotonic()
        results = await self.c.scraper.scrape_all(targets)
        self.c.metrics.scrape_seconds.observe(time.monotonic() - started)
        self.c.metrics.scrape_failures.inc(sum(1 for v in results.values() if v is None))
        counts = {p.uid: m.completed for p in pods if (m := results.get(p.name)) is not None}
        if self.memory.scraped_at:
            self.memory.images_per_minute = status.images_per_minute(
                counts, self.memory.counts, now - self.memory.scraped_at
            )
        self.memory.metrics = results
        self.memory.counts = counts
        self.memory.scraped_at = now

    async def _replace(self, g: GeneratorSpec, replacements: list[faults.Replacement]) -> None:
        self.memory.replacing = list(replacements)
        for r in replacements:
            log.warning("Replacing %s/%s: %s", g.namespace, r.pod.name, r.message)
            if await self.c.kube.delete_pod(g.namespace, r.pod.name, r.pod.uid):
                self.c.metrics.replacements.labels(r.reason).inc()
                await self.c.kube.event(
                    manifests.object_reference(g),
                    reason="PodReplaced",
                    message=f"{r.reason}: {r.message}",
                    action="Replace",
                    warning=True,
                )

    async def _execute(self, g: GeneratorSpec, plan: rollout.Plan) -> None:
        for d in plan.delete:
            if await self.c.kube.delete_pod(g.namespace, d.pod.name, d.pod.uid):
                log.info("Deleted %s/%s: %s", g.namespace, d.pod.name, d.message)
        for slot in plan.create:
            await self.c.kube.apply(manifests.inference_pod(g, self.c.settings, slot))
        if plan.create or plan.delete:
            self.c.metrics.pod_changes.inc(len(plan.create) + len(plan.delete))

    async def _autoscale(self, g: GeneratorSpec, body: Mapping[str, Any]) -> None:
        policy = g.autoscaling
        if policy is None:
            return
        demand = autoscale.Demand.of(self.memory.metrics.values())
        want = self.memory.stabilizer.desired(g.replicas, demand, policy, self.c.clock())
        if want == g.replicas:
            return
        await self.c.kube.scale(g.namespace, g.name, want)
        self.memory.last_scale_time = status.timestamp(self.c.clock())
        n = demand.unanswered
        unanswered = f", {n} pod{'s' if n > 1 else ''} did not answer" if n else ""
        message = (
            f"scaled from {g.replicas} to {want}: {demand.seconds:.1f} s of queued work{unanswered}, "
            f"target {policy.target_queued_seconds:g} s per replica"
        )
        log.info("%s/%s %s", g.namespace, g.name, message)
        await self.c.kube.event(
            manifests.object_reference(g), reason="Scaled", message=message, action="Scale"
        )

    async def _write_status(
        self, g: GeneratorSpec, body: Mapping[str, Any], current: str, verdict: faults.Verdict, now: float
    ) -> None:
        router = self.c.routers.get(self.key, RouterState())
        obs = status.Observation(
            generation=g.generation,
            replicas=g.replicas,
            current_hash=current,
            pods=list(self.c.pods.get(self.key, {}).values()),
            metrics=self.memory.metrics,
            selector=wire.selector_string(wire.pod_selector(g.name)),
            router_endpoint=manifests.router_endpoint(g),
            router_replicas=g.router.replicas,
            router_ready=router.ready,
            images_per_minute=self.memory.images_per_minute,
            problems=verdict.problems,
            replacing=self.memory.replacing or verdict.waiting,
            desired_replicas=self.memory.stabilizer.last if g.autoscaling else None,
            last_scale_time=self.memory.last_scale_time,
        )
        await self._patch_status(body, status.build(obs, self._current_status(body), now))

    async def _write_invalid(self, body: Mapping[str, Any], message: str) -> None:
        meta = body.get("metadata") or {}
        generation = int(meta.get("generation") or 0)
        previous = self._current_status(body)
        obs = status.Observation(
            generation=generation,
            replicas=0,
            current_hash="",
            pods=list(self.c.pods.get(self.key, {}).values()),
            metrics={},
            selector=wire.selector_string(wire.pod_selector(str(meta.get("name")))),
            router_endpoint="",
            router_replicas=0,
            router_ready=0,
            images_per_minute=0.0,
            invalid=message,
        )
        new = {
            "observedGeneration": generation,
            "selector": obs.selector,
            "conditions": status.carry_times(
                status.conditions(obs), previous.get("conditions") or [], self.c.clock()
            ),
        }
        await self._patch_status(body, {**previous, **new})

    def _current_status(self, body: Mapping[str, Any]) -> dict[str, Any]:
        if self.memory.written is not None:
            return self.memory.written
        return dict(body.get("status") or {})

    async def _patch_status(self, body: Mapping[str, Any], new: dict[str, Any]) -> None:
        old = self._current_status(body)
        if not status.changed(new, old):
            return
        patch: dict[str, Any] = dict(new)
        for k in set(old) - set(new):
            patch[k] = None
        await self.c.kube.patch_status(self.key[0], self.key[1], patch)
        self.memory.written = new
        self.c.metrics.status_writes.inc()


def _namespace_closing(exc: Exception) -> bool:
    """The API refuses new objects because the generator's namespace is terminating."""
    body = getattr(exc, "body", None)
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    return getattr(exc, "status", None) == 403 and "being terminated" in text
