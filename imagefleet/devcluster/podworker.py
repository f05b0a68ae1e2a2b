"""One pod on a process node, from admission to the kubelet's final delete.

A :class:`PodWorker` owns one pod (by UID) and runs one thread: an event loop fed by the informer
(pod updates, the pod vanishing), by its processes (exits) and by its probe threads (results),
plus timers (crash back-off, retries, volume re-sync). Everything about the pod's state changes
on that thread only; other threads just post events. See :mod:`.kubelet` for the overview.
"""

from __future__ import annotations

import logging
import os
import queue
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagefleet.devcluster import podspec
from imagefleet.devcluster.ipam import IpPool
from imagefleet.devcluster.kubeapi import SMP, Kube, KubeError, path, retry
from imagefleet.devcluster.podstatus import (
    ConditionClock,
    ContainerStatus,
    CrashBackoff,
    exit_code,
    now,
    parse_time,
    pod_phase,
    readiness_gates_ok,
    render_status,
    rfc3339,
    should_restart,
)
from imagefleet.devcluster.probes import (
    LIVENESS,
    READINESS,
    STARTUP,
    ProbeSpec,
    ProbeState,
    Target,
    container_probes,
    run_handler,
)
from imagefleet.devcluster.runtime import ContainerProcess, Spawner
from imagefleet.devcluster.sandbox import PodSandbox

log = logging.getLogger("imagefleet.devcluster.kubelet")

TICK_S = 0.25
RETRY_S = 2.0
MIN_GRACE_AFTER_PRESTOP_S = 2.0
# A container without `command` would run its image's entrypoint, unknown here: it idles instead,
# until SIGTERM (then exits 0).
IDLE_COMMAND = (
    sys.executable,
    "-I",
    "-c",
    "import signal, sys; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); signal.pause()",
)
TERMINAL = ("Succeeded", "Failed")


@dataclass
class NodeContext:
    """The process node a pod runs on."""

    name: str
    index: int
    host_ip: str
    pool: IpPool


@dataclass
class WorkerContext:
    """What every pod worker of one kubelet shares."""

    kube: Kube
    spawner: Spawner
    state_dir: Path
    stop: threading.Event
    on_done: Callable[[str, bool], None]  # (uid, finished normally)
    crash_backoff_s: float = 10.0
    max_backoff_s: float = 300.0
    sync_interval_s: float = 2.0
    token_expiration_s: int = 86400
    inherit_env: Mapping[str, str] = field(default_factory=dict)


@dataclass
class _Updated:
    pod: dict[str, Any]


@dataclass
class _Gone:
    pass


@dataclass
class _Shutdown:
    pass


@dataclass
class _Exited:
    name: str
    generation: int
    returncode: int


@dataclass
class _Probed:
    name: str
    generation: int
    kind: str
    ok: bool
    message: str


@dataclass
class _HookFailed:
    name: str
    generation: int
    message: str


class _Container:
    """The worker's record of one container: its status, process, probes and back-off."""

    def __init__(
        self, spec: dict[str, Any], init: bool, previous: Mapping[str, Any] | None, backoff: CrashBackoff
    ):
        self.spec = spec
        self.name: str = spec["name"]
        self.init = init
        self.status = ContainerStatus(name=self.name, image=str(spec.get("image", "")), init=init)
        if previous:  # adopted after a kubelet restart: the processes are gone, the counts are not
            self.status.restart_count = int(previous.get("restartCount") or 0)
            state = previous.get("state") or {}
            if "running" in state or "terminated" in state or (previous.get("lastState") or {}):
                self.status.runs = 1
        self.probe_specs: dict[str, ProbeSpec] = {} if init else container_probes(spec)
        self.probes: dict[str, ProbeState] = {}
        self.probe_stop = threading.Event()
        self.proc: ContainerProcess | None = None
        self.generation = 0
        self.backoff = backoff
        self.restart_at: float | None = None
        self.retry_at: float | None = None
        self.started_mono = 0.0
        self.killing = False
        self.kill_deadline = 0.0
        self.kill_reason = ""
        self.target: Target | None = None

    @property
    def lifecycle(self) -> Mapping[str, Any]:
        return self.spec.get("lifecycle") or {}


class PodWorker:
    """Runs one pod's containers as local processes and reports its status (module docstring)."""

    def __init__(self, ctx: WorkerContext, node: NodeContext, pod: dict[str, Any]) -> None:
        meta, spec, status = pod["metadata"], pod.get("spec") or {}, pod.get("status") or {}
        self.ctx, self.node, self.pod = ctx, node, pod
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.key = f"{self.namespace}/{self.name}"
        self.events: queue.Queue[Any] = queue.Queue()
        self.policy = spec.get("restartPolicy") or "Always"
        previous = {
            s["name"]: s
            for s in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]
        }

        def backoff() -> CrashBackoff:
            return CrashBackoff(ctx.crash_backoff_s, ctx.max_backoff_s)

        self.init = [
            _Container(c, True, previous.get(c["name"]), backoff()) for c in spec.get("initContainers") or []
        ]
        self.regular = [
            _Container(c, False, previous.get(c["name"]), backoff()) for c in spec.get("containers") or []
        ]
        self.host_network = bool(spec.get("hostNetwork"))
        self.previous_ip: str | None = status.get("podIP")
        self.pod_ip: str | None = None
        self.start_time = parse_time(status.get("startTime")) or now()
        self.clock = ConditionClock.seeded(status.get("conditions") or [])
        # A pod already Succeeded or Failed when the kubelet first sees it runs nothing again.
        self.completed = status.get("phase") in TERMINAL
        self.pod_dir = ctx.state_dir / "pods" / f"{self.namespace}_{self.name}"
        self.run_dir = self.pod_dir / self.uid
        self.sandbox = PodSandbox(
            ctx.kube,
            ctx.state_dir,
            self.run_dir,
            pod,
            host_ip=node.host_ip,
            token_expiration_s=ctx.token_expiration_s,
        )
        self.prepared = False
        self.prepare_at = 0.0
        self.sync_at = 0.0
        self.terminating = False
        self.gone = False
        self.finished = False
        self.last_status: dict[str, Any] | None = None
        self.status_at = 0.0
        self.status_failures = 0
        self.thread = threading.Thread(target=self._run, name=f"pod {self.key}", daemon=True)

    # -- called from other threads ---------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def update(self, pod: dict[str, Any]) -> None:
        self.events.put(_Updated(pod))

    def vanish(self) -> None:
        """The pod is gone from the API (force-deleted): kill everything at once."""
        self.events.put(_Gone())

    def shutdown(self) -> None:
        """The kubelet stops: end the processes, leave the API alone."""
        self.events.put(_Shutdown())

    def describe(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "uid": self.uid,
            "node": self.node.name,
            "podIP": self.pod_ip,
            "terminating": self.terminating,
            "containers": [
                {
                    "name": c.name,
                    "state": c.status.state,
                    "pid": c.status.pid,
                    "restarts": c.status.restart_count,
                }
                for c in self._all()
            ],
        }

    # -- the loop --------------------------------------------------------------------------------

    def _all(self) -> list[_Container]:
        return [*self.init, *self.regular]

    def _run(self) -> None:
        normal = False
        try:
            if self.pod["metadata"].get("deletionTimestamp"):
                self._begin_termination()
            self._loop()
            normal = True
        except Exception:
            log.exception("pod %s: worker failed; killing its processes", self.key)
            self._kill_now()
        finally:
            self.node.pool.release(self.uid)
            self.ctx.on_done(self.uid, normal)

    def _loop(self) -> None:
        while not self.finished:
            self._sync_status()
            try:
                event: Any = self.events.get(timeout=TICK_S)
            except queue.Empty:
                event = None
            while event is not None and not self.finished:
                self._handle(event)
                try:
                    event = self.events.get_nowait()
                except queue.Empty:
                    event = None
            if not self.finished:
                self._step()

    def _handle(self, event: Any) -> None:
        if isinstance(event, _Updated):
            self.pod = event.pod
            if self.last_status is not None and _overwritten(event.pod, self.last_status):
                # Someone else wrote our status (the node controller marks pods not ready when a
                # node's heartbeats stopped, e.g. while the apiserver was away): post ours again,
                # as the kubelet's status manager reconciles.
                self.last_status = None
            if event.pod["metadata"].get("deletionTimestamp"):
                self._begin_termination()
        elif isinstance(event, _Exited):
            self._on_exit(event)
        elif isinstance(event, _Probed):
            self._on_probe(event)
        elif isinstance(event, _HookFailed):
            c = self._container(event.name)
            if c is not None and c.generation == event.generation:
                self._kill(c, f"PostStartHook failed: {event.message}", run_pre_stop=False)
        elif isinstance(event, _Gone):
            log.info("pod %s: gone from the API; killing its processes", self.key)
            self.gone = True
            self._kill_now()
            self._cleanup()
            self.finished = True
        elif isinstance(event, _Shutdown):
            self._kill_now(grace=3.0)
            self.finished = True

    def _step(self) -> None:
        mono = time.monotonic()
        if self.terminating:
            if all(c.proc is None for c in self._all()):
                self._finalize()
            return
        if self.completed or pod_phase(self._statuses(True), self._statuses(False)) in TERMINAL:
            if all(c.proc is None for c in self._all()):
                self.node.pool.release(self.uid)
            return
        if not self.prepared:
            if mono >= self.prepare_at:
                self._prepare()
            if not self.prepared:
                return
        if mono >= self.sync_at:
            self._resync()
        for c in self.init:
            if c.status.final:
                if c.status.exit_code == 0:
                    continue
                return
            self._maybe_start(c, mono)
            return
        for c in self.regular:
            if not c.status.final:
                self._maybe_start(c, mono)

    def _statuses(self, init: bool) -> list[ContainerStatus]:
        return [c.status for c in (self.init if init else self.regular)]

    def _container(self, name: str) -> _Container | None:
        return next((c for c in self._all() if c.name == name), None)

    # -- sandbox: IP, directories, volumes, service account -------------------------------------

    def _prepare(self) -> None:
        try:
            if self.pod_ip is None:
                self.pod_ip = (
                    self.node.host_ip
                    if self.host_network
                    else self.node.pool.allocate(self.uid, preferred=self.previous_ip)
                )
            self.sandbox.prepare(self.pod, self.pod_ip)
        except Exception as err:
            message = f"setting up the pod failed: {err}"
            log.warning("pod %s: %s; retrying in %gs", self.key, message, RETRY_S)
            for c in self._all():
                if c.proc is None and c.status.runs == 0:
                    c.status.waiting("ContainerCreating", message)
            self.prepare_at = time.monotonic() + RETRY_S
            return
        self.prepared = True
        self.sync_at = time.monotonic() + self.ctx.sync_interval_s
        for c in self.regular if self.init else []:
            c.status.waiting("PodInitializing")
        for c in self._all():
            if c.status.reason == "ContainerCreating":
                c.status.message = ""

    def _resync(self) -> None:
        self.sync_at = time.monotonic() + self.ctx.sync_interval_s
        self.sandbox.resync(self.pod)

    # -- containers ------------------------------------------------------------------------------

    def _maybe_start(self, c: _Container, mono: float) -> None:
        if c.proc is not None or c.killing:
            return
        if (c.restart_at is not None and mono < c.restart_at) or (
            c.retry_at is not None and mono < c.retry_at
        ):
            return
        self._start(c)

    def _start(self, c: _Container) -> None:
        pod_ip = self.pod_ip or ""
        try:
            env = podspec.resolve_env(
                c.spec,
                self.pod,
                pod_ip=pod_ip,
                host_ip=self.node.host_ip,
                secret=self.sandbox.secret_text,
                config_map=self.sandbox.config_map_text,
            )
        except Exception as err:
            c.status.waiting("CreateContainerConfigError", str(err))
            c.retry_at = time.monotonic() + RETRY_S
            return
        mounts = self.sandbox.mounts(c.spec, env)
        base = {
            **self.ctx.inherit_env,
            "HOME": str(self.run_dir / "home"),
            "TMPDIR": str(self.run_dir / "tmp"),
            "HOSTNAME": str((self.pod.get("spec") or {}).get("hostname") or self.name),
            "PYTHONUNBUFFERED": "1",
        }
        if self.sandbox.kubeconfig is not None:
            base["KUBECONFIG"] = str(self.sandbox.kubeconfig)
        log_path = self.pod_dir / f"{c.name}.log"
        c.generation += 1
        generation = c.generation
        try:
            plan = podspec.launch(
                c.spec,
                env,
                pod_ip=pod_ip,
                mounts=mounts,
                base_env=base,
                venv_bin=os.path.dirname(sys.executable),
                default_cwd=str(self.run_dir / "work"),
                idle_command=IDLE_COMMAND,
            )
            if not c.spec.get("command"):
                log.warning(
                    "pod %s: container %s has no command (image entrypoint unknown): idling", self.key, c.name
                )
            with log_path.open("a") as out:
                out.write(
                    f"--- {rfc3339(now())} process-kubelet: starting {c.name}: {shlex.join(plan.argv)}\n"
                )
            proc = self.ctx.spawner.spawn(
                plan.argv,
                plan.env,
                plan.cwd,
                log_path,
                on_exit=lambda rc: self.events.put(_Exited(c.name, generation, rc)),
            )
        except (podspec.ConfigError, OSError) as err:
            log.warning("pod %s: container %s failed to start: %s", self.key, c.name, err)
            c.status.runs += 1
            c.status.terminated(128, now(), "StartError", str(err))
            self._after_exit(c, 128, 0.0)
            return
        c.proc, c.restart_at, c.retry_at = proc, None, None
        c.started_mono = time.monotonic()
        c.status.running(proc.pid, now())
        c.probe_stop = threading.Event()
        c.probes = {}
        ports = {str(p["name"]): int(p["containerPort"]) for p in c.spec.get("ports") or [] if p.get("name")}
        c.target = Target(
            pod_ip=pod_ip,
            ports=ports,
            env=plan.env,
            cwd=plan.cwd,
            exec_argv=lambda command: podspec.exec_argv(command, env, plan.env["PATH"], pod_ip, mounts),
        )
        log.info(
            "pod %s: started %s (pid %d, restarts %d)", self.key, c.name, proc.pid, c.status.restart_count
        )
        if STARTUP in c.probe_specs:
            self._start_probes(c, (STARTUP,))
        else:
            self._on_started(c)
        hook = c.lifecycle.get("postStart")
        if hook:
            threading.Thread(
                target=self._post_start,
                args=(c, generation, hook, c.target),
                name=f"poststart {c.name}",
                daemon=True,
            ).start()

    def _on_started(self, c: _Container) -> None:
        c.status.started = True
        if not c.init and READINESS not in c.probe_specs:
            c.status.ready = True
        self._start_probes(c, (READINESS, LIVENESS))

    def _post_start(self, c: _Container, generation: int, hook: Mapping[str, Any], target: Target) -> None:
        ok, message = run_handler(hook, target, timeout=30.0)
        if not ok:
            self.events.put(_HookFailed(c.name, generation, message))

    def _start_probes(self, c: _Container, kinds: tuple[str, ...]) -> None:
        for kind in kinds:
            spec = c.probe_specs.get(kind)
            if spec is None or c.target is None:
                continue
            c.probes[kind] = ProbeState(spec)
            delay = max(0.0, c.started_mono + spec.initial_delay - time.monotonic())
            threading.Thread(
                target=self._probe_loop,
                args=(c.name, c.generation, spec, c.target, c.probe_stop, delay),
                name=f"{kind} {self.key}/{c.name}",
                daemon=True,
            ).start()

    def _probe_loop(
        self, name: str, generation: int, spec: ProbeSpec, target: Target, stop: threading.Event, delay: float
    ) -> None:
        if stop.wait(delay):
            return
        while True:
            ok, message = run_handler(spec.handler, target, spec.timeout)
            if stop.is_set():
                return
            self.events.put(_Probed(name, generation, spec.kind, ok, message))
            if stop.wait(spec.period):
                return

    def _on_probe(self, event: _Probed) -> None:
        c = self._container(event.name)
        if c is None or c.generation != event.generation or c.proc is None or c.killing:
            return
        state = c.probes.get(event.kind)
        if state is None:
            return
        changed = state.observe(event.ok)
        if not event.ok:
            log.debug("pod %s: %s probe of %s failed: %s", self.key, event.kind, c.name, event.message)
        if changed is None:
            return
        log.info("pod %s: %s probe of %s now %s (%s)", self.key, event.kind, c.name, changed, event.message)
        grace = state.spec.termination_grace
        if event.kind == STARTUP:
            if changed:
                self._on_started(c)
            else:
                self._kill(c, f"Startup probe failed: {event.message}", grace=grace)
        elif event.kind == READINESS:
            c.status.ready = changed and c.status.started
        elif event.kind == LIVENESS and not changed:
            self._kill(c, f"Liveness probe failed: {event.message}", grace=grace)

    def _on_exit(self, event: _Exited) -> None:
        c = self._container(event.name)
        if c is None or c.generation != event.generation:
            return
        c.proc = None
        c.probe_stop.set()
        c.killing = False
        code = exit_code(event.returncode)
        ran_for = time.monotonic() - c.started_mono
        reason = f" ({c.kill_reason})" if c.kill_reason else ""
        c.kill_reason = ""
        with (self.pod_dir / f"{c.name}.log").open("a") as out:
            out.write(f"--- {rfc3339(now())} process-kubelet: {c.name} exited with code {code}{reason}\n")
        log.info("pod %s: %s exited with code %d after %.1fs%s", self.key, c.name, code, ran_for, reason)
        c.status.terminated(code, now())
        self._after_exit(c, code, ran_for)

    def _after_exit(self, c: _Container, code: int, ran_for: float) -> None:
        if self.terminating or self.gone:
            c.status.final = True
            return
        if should_restart(self.policy, code, init=c.init):
            delay = c.backoff.delay(ran_for)
            c.restart_at = time.monotonic() + delay
            c.status.waiting(
                "CrashLoopBackOff",
                f"back-off {delay:g}s restarting failed container={c.name} pod={self.name}_{self.namespace}({self.uid})",
            )
            return
        c.status.final = True
        if c.init and code != 0:  # restartPolicy Never: the pod fails, nothing else runs
            for other in self._all():
                other.status.final = True

    # -- termination -----------------------------------------------------------------------------

    def _grace(self) -> float:
        meta, spec = self.pod["metadata"], self.pod.get("spec") or {}
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = spec.get("terminationGracePeriodSeconds")
        return float(30 if grace is None else grace)

    def _begin_termination(self) -> None:
        grace = self._grace()
        deadline = time.monotonic() + grace
        if self.terminating:  # a second delete with a shorter grace period
            for c in self._all():
                if c.killing and deadline < c.kill_deadline:
                    c.kill_deadline = deadline
            return
        log.info("pod %s: deleted; stopping its containers (grace %gs)", self.key, grace)
        self.terminating = True
        for c in self._all():
            c.restart_at = c.retry_at = None
            if c.proc is None:
                c.status.final = True
            else:
                self._kill(c, "pod deleted", grace=grace)

    def _kill(
        self, c: _Container, reason: str, *, grace: float | None = None, run_pre_stop: bool = True
    ) -> None:
        """preStop, SIGTERM, SIGKILL at the deadline; on a thread of its own (the exit comes back
        as an event)."""
        if c.proc is None:
            return
        deadline = time.monotonic() + (grace if grace is not None else self._grace())
        if c.killing:
            c.kill_deadline = min(c.kill_deadline, deadline)
            return
        log.info("pod %s: killing %s: %s", self.key, c.name, reason)
        c.killing, c.kill_deadline, c.kill_reason = True, deadline, reason
        c.probe_stop.set()
        c.status.ready = False
        threading.Thread(
            target=self._terminate,
            args=(c, c.proc, run_pre_stop),
            name=f"kill {self.key}/{c.name}",
            daemon=True,
        ).start()

    def _terminate(self, c: _Container, proc: ContainerProcess, run_pre_stop: bool) -> None:
        hook = c.lifecycle.get("preStop")
        if hook and run_pre_stop and c.target is not None:
            remaining = c.kill_deadline - time.monotonic()
            if remaining > 0:
                ok, message = run_handler(hook, c.target, timeout=remaining)
                log.info(
                    "pod %s: preStop of %s %s: %s", self.key, c.name, "done" if ok else "failed", message
                )
                c.kill_deadline = max(c.kill_deadline, time.monotonic() + MIN_GRACE_AFTER_PRESTOP_S)
        proc.signal_group(signal.SIGTERM)
        while not proc.wait(0.1):
            if time.monotonic() >= c.kill_deadline:
                log.info("pod %s: %s still running at the end of its grace period: SIGKILL", self.key, c.name)
                proc.signal_group(signal.SIGKILL)
                proc.wait(10.0)
                return

    def _kill_now(self, grace: float = 0.0) -> None:
        """SIGTERM (when ``grace``) then SIGKILL every process; wait until they are reaped."""
        running = [c for c in self._all() if c.proc is not None]
        for c in running:
            c.probe_stop.set()
            assert c.proc is not None
            c.proc.signal_group(signal.SIGTERM if grace else signal.SIGKILL)
        deadline = time.monotonic() + grace
        for c in running:
            assert c.proc is not None
            if not c.proc.wait(max(0.0, deadline - time.monotonic())):
                c.proc.signal_group(signal.SIGKILL)
                c.proc.wait(5.0)

    def _finalize(self) -> None:
        """Every container has stopped: report it, then the kubelet's final delete."""
        for c in self._all():
            c.status.final = True
            c.status.ready = False
        self._sync_status(force=True)
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": self.uid},
        }

        def delete() -> None:
            try:
                self.ctx.kube.request(
                    "DELETE", path("/api/v1/namespaces", self.namespace, "pods", self.name), body=body
                )
            except KubeError as err:
                if err.status not in (404, 409):  # gone already, or a new pod of the same name
                    raise

        retry(f"final delete of pod {self.key}", delete, self.ctx.stop)
        log.info("pod %s: deleted", self.key)
        self._cleanup()
        self.finished = True

    def _cleanup(self) -> None:
        self.node.pool.release(self.uid)
        self.sandbox.cleanup()

    # -- status ----------------------------------------------------------------------------------

    def _sync_status(self, force: bool = False) -> None:
        if self.gone or self.finished or self.completed:
            return
        if not force and time.monotonic() < self.status_at:
            return
        status = render_status(
            init=self._statuses(True),
            regular=self._statuses(False),
            clock=self.clock,
            pod_ip=self.pod_ip,
            host_ip=self.node.host_ip,
            start_time=self.start_time,
            sandbox_ready=self.prepared,
            gates_ok=readiness_gates_ok(self.pod),
            at=now(),
        )
        if status == self.last_status:
            return
        try:
            self.ctx.kube.request(
                "PATCH",
                path("/api/v1/namespaces", self.namespace, "pods", self.name, "status"),
                # The UID makes the patch fail (409) on a new pod that took this one's name.
                body={"metadata": {"uid": self.uid}, "status": status},
                content_type=SMP,
                timeout=(3.0, 10.0),
            )
        except Exception as err:
            self.status_failures += 1
            wait = min(10.0, 0.25 * 2**self.status_failures)
            if self.status_failures <= 3 or self.status_failures % 10 == 0:
                log.warning("pod %s: status update failed: %s", self.key, err)
            self.status_at = time.monotonic() + wait
            return
        self.status_failures = 0
        self.last_status = status


def _condition_states(status: Mapping[str, Any]) -> dict[str, str]:
    """A pod status's conditions as {type: status}, timestamps aside."""
    return {str(c.get("type")): str(c.get("status")) for c in status.get("conditions") or []}


def _overwritten(pod: Mapping[str, Any], posted: Mapping[str, Any]) -> bool:
    """Whether a condition this kubelet posted now reads otherwise in the API (others' conditions,
    such as the scheduler's PodScheduled, are theirs)."""
    ours, theirs = _condition_states(posted), _condition_states(pod.get("status") or {})
    return any(theirs.get(kind, state) != state for kind, state in ours.items())
