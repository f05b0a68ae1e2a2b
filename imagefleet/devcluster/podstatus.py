"""What the process kubelet reports: container statuses, pod phase, conditions, crash back-off.

Pure code: a :class:`ContainerStatus` is the kubelet's record of one container, mutated by the
pod worker; the ``render_*`` functions turn records into the API's ``status`` fields.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

WAITING, RUNNING, TERMINATED = "waiting", "running", "terminated"


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def rfc3339(moment: datetime.datetime | None) -> str | None:
    """An API ``Time`` (seconds precision, UTC)."""
    if moment is None:
        return None
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_micro(moment: datetime.datetime) -> str:
    """An API ``MicroTime`` (a Lease's renewTime)."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def exit_code(returncode: int) -> int:
    """A Popen return code as a container exit code: killed by signal N means 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class ContainerStatus:
    """The kubelet's record of one container (init or regular)."""

    name: str
    image: str
    init: bool = False
    state: str = WAITING
    reason: str = "ContainerCreating"
    message: str = ""
    pid: int | None = None
    started_at: datetime.datetime | None = None
    exit_code: int | None = None
    finished_at: datetime.datetime | None = None
    last: dict[str, Any] | None = None  # lastState.terminated, as rendered
    restart_count: int = 0
    ready: bool = False
    started: bool = False
    final: bool = False  # terminated and will not run again
    runs: int = 0  # how many times this kubelet (or one before it) started the container

    @property
    def container_id(self) -> str | None:
        return f"process://{self.pid}" if self.pid is not None else None

    def waiting(self, reason: str, message: str = "") -> None:
        """Move to waiting; a terminated run becomes ``lastState``."""
        if self.state == TERMINATED:
            self.last = self._terminated()
        self.state, self.reason, self.message = WAITING, reason, message
        self.ready = self.started = False

    def running(self, pid: int, at: datetime.datetime) -> None:
        if self.state == TERMINATED:
            self.last = self._terminated()
        if self.runs > 0:
            self.restart_count += 1
        self.runs += 1
        self.state, self.reason, self.message = RUNNING, "", ""
        self.pid, self.started_at = pid, at
        self.exit_code = self.finished_at = None
        self.ready = self.started = False

    def terminated(self, code: int, at: datetime.datetime, reason: str = "", message: str = "") -> None:
        self.state = TERMINATED
        self.exit_code, self.finished_at = code, at
        self.reason = reason or ("Completed" if code == 0 else "Error")
        self.message = message
        self.ready = self.started = False

    def _terminated(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "exitCode": self.exit_code if self.exit_code is not None else 0,
            "reason": self.reason,
            "startedAt": rfc3339(self.started_at or self.finished_at),
            "finishedAt": rfc3339(self.finished_at),
        }
        if self.message:
            data["message"] = self.message
        if self.container_id:
            data["containerID"] = self.container_id
        return data


def render_container(c: ContainerStatus) -> dict[str, Any]:
    """One entry of ``containerStatuses`` / ``initContainerStatuses``."""
    if c.state == RUNNING:
        state: dict[str, Any] = {"running": {"startedAt": rfc3339(c.started_at)}}
    elif c.state == TERMINATED:
        state = {"terminated": c._terminated()}
    else:
        waiting = {"reason": c.reason}
        if c.message:
            waiting["message"] = c.message
        state = {"waiting": waiting}
    rendered: dict[str, Any] = {
        "name": c.name,
        "image": c.image,
        "imageID": f"process://{c.image}",
        "ready": c.ready,
        "started": c.started,
        "restartCount": c.restart_count,
        "state": state,
        "lastState": {"terminated": c.last} if c.last else {},
    }
    if c.container_id:
        rendered["containerID"] = c.container_id
    return rendered


def pod_phase(init: Sequence[ContainerStatus], regular: Sequence[ContainerStatus]) -> str:
    """The pod's phase from its containers (the kubelet's getPhase, simplified)."""
    if any(c.final and c.exit_code not in (0, None) for c in init):
        return "Failed"
    if not all(c.final and c.exit_code == 0 for c in init):
        return "Pending"
    if any(c.state == WAITING and c.runs == 0 for c in regular):
        return "Pending"
    if any(c.state == RUNNING for c in regular):
        return "Running"
    if regular and all(c.final for c in regular):
        return "Succeeded" if all(c.exit_code == 0 for c in regular) else "Failed"
    return "Running"


def initialized(init: Sequence[ContainerStatus]) -> bool:
    return all(c.final and c.exit_code == 0 for c in init)


def pod_conditions(
    init: Sequence[ContainerStatus],
    regular: Sequence[ContainerStatus],
    *,
    sandbox_ready: bool,
    phase: str,
    gates_ok: bool = True,
) -> list[tuple[str, bool, str, str]]:
    """(type, status, reason, message) of the conditions the kubelet owns."""
    done = phase in ("Succeeded", "Failed")
    unready = [c.name for c in regular if not c.ready]
    conditions: list[tuple[str, bool, str, str]] = [
        ("PodReadyToStartContainers", sandbox_ready and not done, "", ""),
    ]
    if init and not initialized(init):
        waiting = [c.name for c in init if not (c.final and c.exit_code == 0)]
        conditions.append(
            (
                "Initialized",
                False,
                "ContainersNotInitialized",
                f"containers with incomplete status: [{' '.join(waiting)}]",
            )
        )
    else:
        conditions.append(("Initialized", True, "", ""))
    if done:
        reason, message = "PodCompleted", ""
        ready = False
    elif unready:
        reason, message = "ContainersNotReady", f"containers with unready status: [{' '.join(unready)}]"
        ready = False
    else:
        reason, message, ready = "", "", True
    conditions.append(("ContainersReady", ready, reason, message))
    if ready and not gates_ok:
        conditions.append(
            ("Ready", False, "ReadinessGatesNotReady", "the status of pod readiness gate is not True")
        )
    else:
        conditions.append(("Ready", ready, reason, message))
    conditions.append(("PodScheduled", True, "", ""))
    return conditions


@dataclass
class ConditionClock:
    """Keeps each condition's ``lastTransitionTime`` stable until its status changes."""

    since: dict[str, tuple[str, str]] = field(default_factory=dict)  # type -> (status, time)

    @classmethod
    def seeded(cls, existing: Iterable[Mapping[str, Any]]) -> ConditionClock:
        clock = cls()
        for c in existing:
            if c.get("type") and c.get("lastTransitionTime"):
                clock.since[str(c["type"])] = (str(c.get("status")), str(c["lastTransitionTime"]))
        return clock

    def render(
        self, conditions: Iterable[tuple[str, bool, str, str]], at: datetime.datetime
    ) -> list[dict[str, Any]]:
        out = []
        for kind, ok, reason, message in conditions:
            status = "True" if ok else "False"
            previous = self.since.get(kind)
            if previous is None or previous[0] != status:
                previous = (status, rfc3339(at) or "")
                self.since[kind] = previous
            # Explicit nulls: a strategic merge patch merges conditions by type, so a reason left
            # out would survive from the previous status.
            item: dict[str, Any] = {
                "type": kind,
                "status": status,
                "lastTransitionTime": previous[1],
                "reason": reason or None,
                "message": message or None,
            }
            out.append(item)
        return out


def readiness_gates_ok(pod: Mapping[str, Any]) -> bool:
    """True when every ``spec.readinessGates`` condition in the pod's status is True."""
    gates = [g.get("conditionType") for g in (pod.get("spec") or {}).get("readinessGates") or []]
    if not gates:
        return True
    status = {c.get("type"): c.get("status") for c in (pod.get("status") or {}).get("conditions") or []}
    return all(status.get(g) == "True" for g in gates)


def render_status(
    *,
    init: Sequence[ContainerStatus],
    regular: Sequence[ContainerStatus],
    clock: ConditionClock,
    pod_ip: str | None,
    host_ip: str,
    start_time: datetime.datetime,
    sandbox_ready: bool,
    gates_ok: bool,
    at: datetime.datetime,
) -> dict[str, Any]:
    """The ``status`` the kubelet patches onto the pod."""
    phase = pod_phase(init, regular)
    conditions = pod_conditions(init, regular, sandbox_ready=sandbox_ready, phase=phase, gates_ok=gates_ok)
    status: dict[str, Any] = {
        "phase": phase,
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "startTime": rfc3339(start_time),
        "conditions": clock.render(conditions, at),
        "containerStatuses": [render_container(c) for c in regular],
    }
    if init:
        status["initContainerStatuses"] = [render_container(c) for c in init]
    if pod_ip:
        status["podIP"] = pod_ip
        status["podIPs"] = [{"ip": pod_ip}]
    return status


class CrashBackoff:
    """The delay before restarting a container that exited: ``base`` doubling up to ``cap``, back
    to ``base`` once a run lasted ``reset_after`` seconds (the kubelet: 10 s, 300 s, 10 min)."""

    def __init__(self, base: float = 10.0, cap: float = 300.0, reset_after: float = 600.0) -> None:
        self.base, self.cap, self.reset_after = base, cap, reset_after
        self._next = base

    def delay(self, ran_for: float) -> float:
        """The wait before the next start, given how long the run that just ended lasted."""
        if ran_for >= self.reset_after:
            self._next = self.base
        current = self._next
        self._next = min(self.cap, self._next * 2)
        return current


def should_restart(policy: str, code: int, *, init: bool) -> bool:
    """Whether a container that exited with ``code`` runs again under the pod's restartPolicy."""
    if init:
        return code != 0 and policy != "Never"
    if policy == "Always":
        return True
    if policy == "OnFailure":
        return code != 0
    return False
