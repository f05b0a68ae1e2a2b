"""Probes and lifecycle hooks: their settings, their result state machine and how they run.

:class:`ProbeState` is pure (no clock, no I/O): it turns a stream of single check outcomes into
the probe's result with Kubernetes' thresholds. :func:`run_handler` performs one check or hook
(``httpGet``, ``tcpSocket``, ``exec``, and ``sleep`` for hooks) against a pod on loopback.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

STARTUP, READINESS, LIVENESS = "startup", "readiness", "liveness"
USER_AGENT = "kube-probe/1.36"


@dataclass(frozen=True)
class ProbeSpec:
    """One probe with Kubernetes' defaults filled in."""

    kind: str
    handler: Mapping[str, Any]
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3
    termination_grace: float | None = None

    @classmethod
    def parse(cls, kind: str, probe: Mapping[str, Any]) -> ProbeSpec:
        grace = probe.get("terminationGracePeriodSeconds")
        success = int(probe.get("successThreshold") or 1)
        return cls(
            kind=kind,
            handler=probe,
            initial_delay=float(probe.get("initialDelaySeconds") or 0),
            period=float(probe.get("periodSeconds") or 10),
            timeout=float(probe.get("timeoutSeconds") or 1),
            # Liveness and startup probes must use 1 (API validation); keep that true here too.
            success_threshold=success if kind == READINESS else 1,
            failure_threshold=int(probe.get("failureThreshold") or 3),
            termination_grace=float(grace) if grace is not None else None,
        )


def container_probes(container: Mapping[str, Any]) -> dict[str, ProbeSpec]:
    """The probes a container declares, by kind."""
    found = {}
    for kind in (STARTUP, READINESS, LIVENESS):
        probe = container.get(f"{kind}Probe")
        if probe:
            found[kind] = ProbeSpec.parse(kind, probe)
    return found


@dataclass
class ProbeState:
    """A probe's result from consecutive outcomes: it flips to success after ``success_threshold``
    successes in a row and to failure after ``failure_threshold`` failures in a row.

    ``result`` starts as Kubernetes starts it: None (unknown) for startup, False for readiness
    (not ready until a check passes), True for liveness (alive until checks fail).
    """

    spec: ProbeSpec
    result: bool | None = field(default=None)
    successes: int = 0
    failures: int = 0

    def __post_init__(self) -> None:
        if self.result is None:
            self.result = {STARTUP: None, READINESS: False, LIVENESS: True}[self.spec.kind]

    def observe(self, ok: bool) -> bool | None:
        """Record one outcome; the new result when it changed, else None."""
        if ok:
            self.successes += 1
            self.failures = 0
            flip = self.successes >= self.spec.success_threshold and self.result is not True
            new = True
        else:
            self.failures += 1
            self.successes = 0
            flip = self.failures >= self.spec.failure_threshold and self.result is not False
            new = False
        if flip:
            self.result = new
            return new
        return None


@dataclass(frozen=True)
class Target:
    """Where and how a container's probes and hooks run."""

    pod_ip: str
    ports: Mapping[str, int]  # named containerPorts
    env: Mapping[str, str]  # the container process's environment
    cwd: str
    exec_argv: Callable[[Sequence[str]], list[str]]  # expands and translates an exec command


def run_handler(handler: Mapping[str, Any], target: Target, timeout: float) -> tuple[bool, str]:
    """Run one probe check or hook; (success, what happened)."""
    try:
        if "httpGet" in handler:
            return _http_get(handler["httpGet"], target, timeout)
        if "tcpSocket" in handler:
            return _tcp(handler["tcpSocket"], target, timeout)
        if "exec" in handler:
            return _exec(handler["exec"].get("command") or [], target, timeout)
        if "sleep" in handler:
            seconds = float(handler["sleep"].get("seconds") or 0)
            time.sleep(max(0.0, min(seconds, timeout)))
            return True, f"slept {seconds:g}s"
        if "grpc" in handler:
            return True, "grpc checks are not run by the process kubelet (counted as success)"
    except (OSError, http.client.HTTPException, ValueError, subprocess.SubprocessError) as err:
        return False, f"{type(err).__name__}: {err}"
    return False, f"unsupported handler {sorted(handler)}"


def _port(value: Any, target: Target) -> int:
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return int(value)
    if value in target.ports:
        return int(target.ports[value])
    raise ValueError(f"named port {value!r} not found in the container's ports")


def _host(value: Any, target: Target) -> str:
    return target.pod_ip if not value or value == "0.0.0.0" else str(value)


def _http_get(spec: Mapping[str, Any], target: Target, timeout: float) -> tuple[bool, str]:
    host, port = _host(spec.get("host"), target), _port(spec.get("port"), target)
    path = spec.get("path") or "/"
    if not path.startswith("/"):
        path = "/" + path
    connection: http.client.HTTPConnection
    if str(spec.get("scheme") or "HTTP").upper() == "HTTPS":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    else:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {"User-Agent": USER_AGENT, "Accept": "*/*"}
    for header in spec.get("httpHeaders") or []:
        headers[str(header.get("name"))] = str(header.get("value", ""))
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        response.read(10_000)
    finally:
        connection.close()
    ok = 200 <= response.status < 400
    return ok, f"HTTP probe {'succeeded' if ok else 'failed'} with statuscode: {response.status}"


def _tcp(spec: Mapping[str, Any], target: Target, timeout: float) -> tuple[bool, str]:
    host, port = _host(spec.get("host"), target), _port(spec.get("port"), target)
    with socket.create_connection((host, port), timeout=timeout):
        return True, f"connected to {host}:{port}"


def _exec(command: Sequence[str], target: Target, timeout: float) -> tuple[bool, str]:
    argv = target.exec_argv(command)
    if not argv:
        return False, "empty exec command"
    code, output = run_command(argv, target.env, target.cwd, timeout)
    tail = output.strip()[-300:]
    return code == 0, f"exit code {code}" + (f": {tail}" if tail else "")


def run_command(argv: Sequence[str], env: Mapping[str, str], cwd: str, timeout: float) -> tuple[int, str]:
    """Run a command in its own process group; on timeout kill the group. (exit code, output)."""
    proc = subprocess.Popen(
        list(argv),
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        process_group=0,
    )
    try:
        out, _ = proc.communicate(timeout=max(timeout, 0.001))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return -1, f"command timed out after {timeout:g}s"
    return proc.returncode, out.decode(errors="replace")
