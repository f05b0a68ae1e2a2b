"""The process kubelet's pure parts: env and ``$(VAR)``, translations, IPs, probes, status, back-off,
volumes; and its process runtime on this machine."""

from __future__ import annotations

import base64
import datetime
import http.server
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagefleet.devcluster import nodes, podspec, volumes
from imagefleet.devcluster.ipam import IpPool, PoolExhausted
from imagefleet.devcluster.kubelet import KubeletConfig, parse_args
from imagefleet.devcluster.podspec import ConfigError, expand, launch, resolve_env, sort_mounts, translate
from imagefleet.devcluster.podstatus import (
    ConditionClock,
    ContainerStatus,
    CrashBackoff,
    exit_code,
    pod_conditions,
    pod_phase,
    readiness_gates_ok,
    render_container,
    render_status,
    should_restart,
)
from imagefleet.devcluster.probes import ProbeSpec, ProbeState, Target, container_probes, run_handler
from imagefleet.devcluster.runtime import Spawner

T0 = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
POD: dict[str, Any] = {
    "metadata": {
        "name": "web-0",
        "namespace": "demo",
        "uid": "u-1",
        "labels": {"app": "web", "tier": "front"},
        "annotations": {"note": 'say "hi"'},
    },
    "spec": {"nodeName": "gpu-node-0", "serviceAccountName": "router", "containers": [{"name": "app"}]},
}
SECRETS = {("demo", "creds"): {"user": "alice", "password": "s3cret"}}
CONFIGS = {("demo", "settings"): {"MODE": "fast", "LEVEL": "3"}}


def _secret(namespace: str, name: str) -> dict[str, str] | None:
    return SECRETS.get((namespace, name))


def _config(namespace: str, name: str) -> dict[str, str] | None:
    return CONFIGS.get((namespace, name))


def _env(container: dict[str, Any]) -> dict[str, str]:
    return resolve_env(
        container, POD, pod_ip="127.1.0.7", host_ip="127.0.1.1", secret=_secret, config_map=_config
    )


# -- $(VAR) expansion ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)", "alpha"),
        ("x-$(A)-$(B)", "x-alpha-beta"),
        ("$$(A)", "$(A)"),
        ("$$$(A)", "$alpha"),
        ("$(MISSING)", "$(MISSING)"),
        ("$(A", "$(A"),
        ("cost: $5", "cost: $5"),
        ("trailing $", "trailing $"),
        ("$(A)$(A)", "alphaalpha"),
        ("", ""),
    ],
)
def test_expand_follows_kubernetes(text: str, expected: str) -> None:
    assert expand(text, {"A": "alpha", "B": "beta"}.get) == expected


# -- environment --------------------------------------------------------------------------------


def test_env_from_then_env_with_expansion_of_earlier_values() -> None:
    env = _env(
        {
            "envFrom": [
                {"configMapRef": {"name": "settings"}, "prefix": "CFG_"},
                {"secretRef": {"name": "creds"}},
            ],
            "env": [
                {"name": "CFG_MODE", "value": "slow"},  # env wins over envFrom
                {"name": "GREETING", "value": "hi $(user), mode $(CFG_MODE), $(LATER)"},
                {"name": "LATER", "value": "later"},
            ],
        }
    )
    assert env["CFG_LEVEL"] == "3"
    assert env["CFG_MODE"] == "slow"
    assert env["password"] == "s3cret"
    assert env["GREETING"] == "hi alice, mode slow, $(LATER)"  # only variables defined before expand


def test_env_value_from_field_refs() -> None:
    paths = {
        "NAME": "metadata.name",
        "NS": "metadata.namespace",
        "UID": "metadata.uid",
        "APP": "metadata.labels['app']",
        "NOTE": "metadata.annotations['note']",
        "NONE": "metadata.labels['absent']",
        "IP": "status.podIP",
        "HOST": "status.hostIP",
        "NODE": "spec.nodeName",
        "SA": "spec.serviceAccountName",
    }
    env = _env({"env": [{"name": k, "valueFrom": {"fieldRef": {"fieldPath": v}}} for k, v in paths.items()]})
    assert env == {
        "NAME": "web-0",
        "NS": "demo",
        "UID": "u-1",
        "APP": "web",
        "NOTE": 'say "hi"',
        "NONE": "",
        "IP": "127.1.0.7",
        "HOST": "127.0.1.1",
        "NODE": "gpu-node-0",
        "SA": "router",
    }


def test_env_key_refs_and_optional() -> None:
    env = _env(
        {
            "env": [
                {"name": "USER", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "user"}}},
                {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "MODE"}}},
                {
                    "name": "OPT",
                    "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}},
                },
                {
                    "name": "OPTKEY",
                    "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "x", "optional": True}},
                },
            ],
            "envFrom": [{"secretRef": {"name": "absent", "optional": True}}],
        }
    )
    assert env == {"USER": "alice", "MODE": "fast"}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"valueFrom": {"secretKeyRef": {"name": "nope", "key": "k"}}}, 'secret "nope" not found'),
        ({"valueFrom": {"secretKeyRef": {"name": "creds", "key": "k"}}}, "couldn't find key k in secret"),
        ({"valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k"}}}, 'configmap "nope" not found'),
        ({"valueFrom": {"fieldRef": {"fieldPath": "spec.bogus"}}}, "unsupported fieldRef"),
    ],
)
def test_env_missing_references_fail_the_container(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _env({"env": [{"name": "X", **entry}]})


def test_env_resource_field_refs() -> None:
    container = {
        "resources": {"limits": {"memory": "1Gi", "cpu": "1500m"}, "requests": {"cpu": "250m"}},
        "env": [
            {
                "name": "MEM",
                "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
            },
            {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            {"name": "REQ", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1m"}}},
            {"name": "GPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.ephemeral-storage"}}},
        ],
    }
    env = _env(container)
    assert env == {"MEM": "1024", "CPU": "2", "REQ": "250", "GPU": str(100 * 2**30)}


# -- translations ---------------------------------------------------------------------------------


def test_only_an_exact_wildcard_becomes_the_pod_ip() -> None:
    assert translate("0.0.0.0", "127.1.0.5", []) == "127.1.0.5"
    assert translate("--host=0.0.0.0", "127.1.0.5", []) == "--host=0.0.0.0"
    assert translate("0.0.0.0:80", "127.1.0.5", []) == "0.0.0.0:80"
    assert translate("10.0.0.0", "127.1.0.5", []) == "10.0.0.0"


def test_mount_paths_are_rewritten_longest_first() -> None:
    mounts = sort_mounts(
        [("/data", "/h/data"), ("/data/cache/", "/h/cache"), ("/", "/h/root"), ("/etc/keys", "/h/k")]
    )
    assert [m for m, _ in mounts] == ["/data/cache", "/etc/keys", "/data"]  # "/" is never rewritten
    assert translate("/data", "ip", mounts) == "/h/data"
    assert translate("/data/x/y.txt", "ip", mounts) == "/h/data/x/y.txt"
    assert translate("/data/cache/z", "ip", mounts) == "/h/cache/z"
    assert translate("/data/cache", "ip", mounts) == "/h/cache"
    assert translate("/data2/x", "ip", mounts) == "/data2/x"
    assert translate("--keys=/etc/keys/k", "ip", mounts) == "--keys=/etc/keys/k"
    assert translate("/etc/hosts", "ip", mounts) == "/etc/hosts"


def test_launch_expands_then_translates_once(tmp_path: Path) -> None:
    venv_bin = os.path.dirname(sys.executable)
    mounts = sort_mounts([("/tmp", str(tmp_path / "vol")), ("/keys", str(tmp_path / "keys"))])
    container = {
        "command": ["python", "-m", "app"],
        "args": ["--host", "$(HOST)", "--dir", "$(DIR)/sub", "--keys=$(DIR)", "$$(HOST)"],
        "workingDir": "/keys",
    }
    (tmp_path / "keys").mkdir()
    env = {"HOST": "0.0.0.0", "DIR": "/tmp", "HOME": "/root"}
    plan = launch(
        container,
        env,
        pod_ip="127.1.0.9",
        mounts=mounts,
        base_env={"HOME": "/pod/home", "TMPDIR": "/pod/tmp", "PATH": "/usr/bin"},
        venv_bin=venv_bin,
        default_cwd=str(tmp_path),
        idle_command=["sleep"],
    )
    assert plan.argv[0] == os.path.join(venv_bin, "python")
    # $(DIR) expands to /tmp (untranslated), then the argument is translated exactly once, even
    # though the host path itself lies below /tmp.
    assert plan.argv[1:] == [
        "-m",
        "app",
        "--host",
        "127.1.0.9",
        "--dir",
        f"{tmp_path}/vol/sub",
        "--keys=/tmp",
        "$(HOST)",
    ]
    assert plan.env["HOST"] == "127.1.0.9"
    assert plan.env["DIR"] == str(tmp_path / "vol")
    assert plan.env["HOME"] == "/root"  # the container's own wins over the per-pod default
    assert plan.env["TMPDIR"] == "/pod/tmp"
    assert plan.env["PATH"].split(os.pathsep)[0] == venv_bin
    assert plan.cwd == str(tmp_path / "keys")


def test_launch_without_command_idles_and_missing_executables_fail(tmp_path: Path) -> None:
    common: dict[str, Any] = {
        "pod_ip": "127.1.0.2",
        "mounts": [],
        "base_env": {},
        "venv_bin": os.path.dirname(sys.executable),
        "default_cwd": str(tmp_path),
        "idle_command": [sys.executable, "-c", "pass"],
    }
    idle = launch({"image": "x"}, {}, **common)
    assert idle.argv == [sys.executable, "-c", "pass"]
    assert idle.cwd == str(tmp_path)
    image_path = launch({"command": ["/opt/image/bin/python", "-V"]}, {}, **common)
    assert image_path.argv[0] == os.path.join(os.path.dirname(sys.executable), "python")
    with pytest.raises(ConfigError, match="executable file not found"):
        launch({"command": ["no-such-binary-xyz"]}, {}, **common)


def test_exec_commands_expand_and_translate() -> None:
    mounts = sort_mounts([("/scratch", "/h/s")])
    argv = podspec.exec_argv(
        ["sh", "-c", "echo $(A)", "/scratch/f", "0.0.0.0"], {"A": "a"}, os.defpath, "ip", mounts
    )
    assert argv[0].endswith("/sh") and argv[1:] == ["-c", "echo a", "/h/s/f", "ip"]


# -- IPs --------------------------------------------------------------------------------------------


def test_ip_pool_skips_gateway_and_reuses_freed_addresses() -> None:
    pool = IpPool(nodes.pod_cidr(3))
    first = [pool.allocate(f"pod-{i}") for i in range(3)]
    assert first == ["127.1.3.2", "127.1.3.3", "127.1.3.4"]
    assert pool.allocate("pod-1") == "127.1.3.3"  # an owner keeps its address
    pool.release("pod-1")
    assert pool.owner("127.1.3.3") is None
    assert pool.allocate("pod-9") == "127.1.3.3"  # freed, so reused
    assert pool.allocate("adopted", preferred="127.1.3.77") == "127.1.3.77"
    assert pool.allocate("clash", preferred="127.1.3.77") == "127.1.3.5"  # never two owners
    assert pool.allocate("outside", preferred="127.1.4.9") == "127.1.3.6"
    assert "127.1.3.1" not in pool and "127.1.3.0" not in pool and "127.1.3.255" not in pool


def test_ip_pool_exhaustion() -> None:
    pool = IpPool("127.1.9.0/29")  # .1 .. .6 usable, .1 reserved
    got = {pool.allocate(str(i)) for i in range(5)}
    assert len(got) == 5
    with pytest.raises(PoolExhausted):
        pool.allocate("one-too-many")


# -- probes -------------------------------------------------------------------------------------


def test_probe_defaults() -> None:
    spec = ProbeSpec.parse("readiness", {"httpGet": {"port": 80}})
    assert (
        spec.initial_delay,
        spec.period,
        spec.timeout,
        spec.success_threshold,
        spec.failure_threshold,
    ) == (
        0.0,
        10.0,
        1.0,
        1,
        3,
    )
    liveness = ProbeSpec.parse("liveness", {"exec": {"command": ["true"]}, "successThreshold": 3})
    assert liveness.success_threshold == 1
    assert sorted(container_probes({"startupProbe": {"tcpSocket": {"port": 1}}, "livenessProbe": {}})) == [
        "startup"
    ]


def test_readiness_needs_consecutive_successes_and_failures() -> None:
    state = ProbeState(ProbeSpec.parse("readiness", {"successThreshold": 2, "failureThreshold": 2}))
    assert state.result is False
    assert state.observe(True) is None
    assert state.observe(False) is None  # the run of successes restarts
    assert state.observe(True) is None
    assert state.observe(True) is True
    assert state.observe(True) is None
    assert state.observe(False) is None
    assert state.observe(False) is False
    assert state.observe(False) is None


def test_liveness_starts_alive_and_startup_unknown() -> None:
    liveness = ProbeState(ProbeSpec.parse("liveness", {}))
    assert liveness.result is True
    assert [liveness.observe(False) for _ in range(3)] == [None, None, False]
    startup = ProbeState(ProbeSpec.parse("startup", {"failureThreshold": 2}))
    assert startup.result is None
    assert startup.observe(False) is None
    assert startup.observe(True) is True
    failing = ProbeState(ProbeSpec.parse("startup", {"failureThreshold": 2}))
    assert [failing.observe(False), failing.observe(False)] == [None, False]


@pytest.fixture
def web_server() -> Iterator[tuple[int, list[dict[str, str]]]]:
    seen: list[dict[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(dict(self.headers))
            self.send_response(200 if self.path == "/ok" else 503)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], seen
    server.shutdown()
    server.server_close()


def _target(tmp_path: Path, ports: dict[str, int] | None = None) -> Target:
    return Target(
        pod_ip="127.0.0.1",
        ports=ports or {},
        env={"PATH": os.defpath, "WORD": "hello"},
        cwd=str(tmp_path),
        exec_argv=lambda command: podspec.exec_argv(command, {"W": "x"}, os.defpath, "127.0.0.1", []),
    )


def test_handlers_http_tcp_exec(web_server: tuple[int, list[dict[str, str]]], tmp_path: Path) -> None:
    port, seen = web_server
    target = _target(tmp_path, {"http": port})
    ok, message = run_handler(
        {"httpGet": {"path": "/ok", "port": "http", "httpHeaders": [{"name": "X-Probe", "value": "1"}]}},
        target,
        2,
    )
    assert ok and "200" in message
    assert seen[-1]["X-Probe"] == "1" and seen[-1]["User-Agent"].startswith("kube-probe/")
    assert run_handler({"httpGet": {"path": "/bad", "port": port}}, target, 2) == (
        False,
        "HTTP probe failed with statuscode: 503",
    )
    assert run_handler({"tcpSocket": {"port": port}}, target, 2)[0]
    assert not run_handler({"tcpSocket": {"port": 1}}, target, 1)[0]  # nothing listens on port 1
    assert not run_handler({"httpGet": {"port": "nope"}}, target, 1)[0]
    assert run_handler({"exec": {"command": ["sh", "-c", 'test "$WORD" = hello']}}, target, 5)[0]
    ok, message = run_handler({"exec": {"command": ["sh", "-c", "echo $(W); exit 4"]}}, target, 5)
    assert not ok and message == "exit code 4: x"
    started = time.monotonic()
    ok, message = run_handler({"exec": {"command": ["sleep", "30"]}}, target, 0.5)
    assert not ok and "timed out" in message and time.monotonic() - started < 5
    assert run_handler({"sleep": {"seconds": 0.1}}, target, 5)[0]


# -- status -------------------------------------------------------------------------------------


def test_container_status_rendering_through_a_restart() -> None:
    c = ContainerStatus(name="app", image="imagefleet:dev")
    assert render_container(c)["state"] == {"waiting": {"reason": "ContainerCreating"}}
    c.running(41, T0)
    c.started = c.ready = True
    first = render_container(c)
    assert first["state"] == {"running": {"startedAt": "2026-01-02T03:04:05Z"}}
    assert first["containerID"] == "process://41"
    assert (first["ready"], first["started"], first["restartCount"], first["lastState"]) == (
        True,
        True,
        0,
        {},
    )
    c.terminated(exit_code(1), T0 + datetime.timedelta(seconds=3))
    c.waiting("CrashLoopBackOff", "back-off 10s restarting failed container=app")
    waiting = render_container(c)
    assert waiting["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert waiting["ready"] is False
    assert waiting["lastState"]["terminated"] == {
        "exitCode": 1,
        "reason": "Error",
        "startedAt": "2026-01-02T03:04:05Z",
        "finishedAt": "2026-01-02T03:04:08Z",
        "containerID": "process://41",
    }
    c.running(42, T0 + datetime.timedelta(seconds=13))
    again = render_container(c)
    assert again["restartCount"] == 1 and again["containerID"] == "process://42"
    assert again["lastState"]["terminated"]["exitCode"] == 1
    c.terminated(exit_code(-15), T0 + datetime.timedelta(seconds=20))
    assert render_container(c)["state"]["terminated"]["exitCode"] == 143


def _status(state: str, code: int | None = None, *, final: bool = False, runs: int = 1) -> ContainerStatus:
    c = ContainerStatus(
        name=f"c{state}{code}", image="i", state=state, exit_code=code, final=final, runs=runs
    )
    return c


def test_pod_phase() -> None:
    done = _status("terminated", 0, final=True)
    failed = _status("terminated", 2, final=True)
    running = _status("running")
    creating = _status("waiting", runs=0)
    backoff = _status("waiting")
    assert pod_phase([], [creating]) == "Pending"
    assert pod_phase([], [running, creating]) == "Pending"
    assert pod_phase([], [running]) == "Running"
    assert pod_phase([], [backoff]) == "Running"
    assert pod_phase([], [done, done]) == "Succeeded"
    assert pod_phase([], [done, failed]) == "Failed"
    assert pod_phase([_status("running")], [creating]) == "Pending"
    assert pod_phase([done], [running]) == "Running"
    assert pod_phase([failed], [creating]) == "Failed"


def test_conditions_and_their_transition_times() -> None:
    ready = _status("running")
    ready.ready = True
    unready = ContainerStatus(name="side", image="i", state="running", runs=1)
    conditions = pod_conditions([], [ready, unready], sandbox_ready=True, phase="Running")
    assert [(t, s) for t, s, _, _ in conditions] == [
        ("PodReadyToStartContainers", True),
        ("Initialized", True),
        ("ContainersReady", False),
        ("Ready", False),
        ("PodScheduled", True),
    ]
    assert conditions[3][3] == "containers with unready status: [side]"
    clock = ConditionClock.seeded(
        [{"type": "PodScheduled", "status": "True", "lastTransitionTime": "2020-01-01T00:00:00Z"}]
    )
    first = {c["type"]: c for c in clock.render(conditions, T0)}
    assert first["PodScheduled"]["lastTransitionTime"] == "2020-01-01T00:00:00Z"
    assert first["Ready"]["lastTransitionTime"] == "2026-01-02T03:04:05Z"
    unready.ready = True
    later = T0 + datetime.timedelta(minutes=1)
    second = {
        c["type"]: c
        for c in clock.render(
            pod_conditions([], [ready, unready], sandbox_ready=True, phase="Running"), later
        )
    }
    assert (
        second["Ready"]["status"] == "True"
        and second["Ready"]["lastTransitionTime"] == "2026-01-02T03:05:05Z"
    )
    assert second["Initialized"]["lastTransitionTime"] == "2026-01-02T03:04:05Z"
    gated = pod_conditions([], [ready], sandbox_ready=True, phase="Running", gates_ok=False)
    assert gated[3][:3] == ("Ready", False, "ReadinessGatesNotReady")
    init = pod_conditions(
        [_status("running")], [ContainerStatus(name="a", image="i")], sandbox_ready=True, phase="Pending"
    )
    assert init[1][:3] == ("Initialized", False, "ContainersNotInitialized")


def test_readiness_gates() -> None:
    pod: dict[str, Any] = {
        "spec": {"readinessGates": [{"conditionType": "x/ok"}]},
        "status": {"conditions": []},
    }
    assert not readiness_gates_ok(pod)
    pod["status"]["conditions"] = [{"type": "x/ok", "status": "True"}]
    assert readiness_gates_ok(pod)
    assert readiness_gates_ok({"spec": {}})


def test_render_status() -> None:
    c = ContainerStatus(name="app", image="img")
    c.running(7, T0)
    c.ready = c.started = True
    status = render_status(
        init=[],
        regular=[c],
        clock=ConditionClock(),
        pod_ip="127.1.0.2",
        host_ip="127.0.1.1",
        start_time=T0,
        sandbox_ready=True,
        gates_ok=True,
        at=T0,
    )
    assert status["phase"] == "Running"
    assert status["podIP"] == "127.1.0.2" and status["podIPs"] == [{"ip": "127.1.0.2"}]
    assert status["hostIP"] == "127.0.1.1" and status["startTime"] == "2026-01-02T03:04:05Z"
    assert {x["type"]: x["status"] for x in status["conditions"]}["Ready"] == "True"
    assert "initContainerStatuses" not in status


def test_crash_backoff_doubles_caps_and_resets() -> None:
    backoff = CrashBackoff(base=10, cap=300, reset_after=600)
    assert [backoff.delay(ran_for=1) for _ in range(7)] == [10, 20, 40, 80, 160, 300, 300]
    assert backoff.delay(ran_for=600) == 10
    assert backoff.delay(ran_for=5) == 20
    fast = CrashBackoff(base=1, cap=4)
    assert [fast.delay(0) for _ in range(4)] == [1, 2, 4, 4]


@pytest.mark.parametrize(
    ("policy", "code", "init", "restart"),
    [
        ("Always", 0, False, True),
        ("Always", 1, False, True),
        ("OnFailure", 0, False, False),
        ("OnFailure", 1, False, True),
        ("Never", 1, False, False),
        ("Always", 0, True, False),
        ("Always", 1, True, True),
        ("Never", 1, True, False),
    ],
)
def test_should_restart(policy: str, code: int, init: bool, restart: bool) -> None:
    assert should_restart(policy, code, init=init) is restart


# -- volumes ------------------------------------------------------------------------------------


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _lookup(objects: dict[str, dict[str, Any]]) -> Any:
    return lambda namespace, name: objects.get(name)


def _contents(
    volume_spec: dict[str, Any], objects: dict[str, dict[str, Any]], tmp_path: Path
) -> volumes.Files:
    pod = {**POD, "spec": {**POD["spec"], "volumes": [volume_spec]}}
    (volume,) = volumes.plan(pod, tmp_path / "pod", tmp_path / "state").values()
    return volumes.contents(
        volume,
        pod,
        secret=_lookup(objects),
        config_map=_lookup(objects),
        token=lambda audience, expiration: f"token-{audience}-{expiration}",
        pod_ip="127.1.0.2",
        host_ip="127.0.1.1",
    )


def test_secret_and_config_map_volumes(tmp_path: Path) -> None:
    objects = {
        "keys": {"data": {"api-keys": _b64("sk-1\n"), "other": _b64("x")}},
        "conf": {"data": {"a.yaml": "a: 1"}, "binaryData": {"blob": _b64("\x00\x01")}},
    }
    whole = _contents(
        {"name": "v", "secret": {"secretName": "keys", "defaultMode": 0o400}}, objects, tmp_path
    )
    assert whole == {"api-keys": (b"sk-1\n", 0o400), "other": (b"x", 0o400)}
    picked = _contents(
        {
            "name": "v",
            "secret": {"secretName": "keys", "items": [{"key": "other", "path": "sub/o.txt", "mode": 0o600}]},
        },
        objects,
        tmp_path,
    )
    assert picked == {"sub/o.txt": (b"x", 0o600)}
    conf = _contents({"name": "v", "configMap": {"name": "conf"}}, objects, tmp_path)
    assert conf == {"a.yaml": (b"a: 1", 0o644), "blob": (b"\x00\x01", 0o644)}
    assert (
        _contents({"name": "v", "secret": {"secretName": "gone", "optional": True}}, objects, tmp_path) == {}
    )
    with pytest.raises(volumes.VolumeError, match='secret "gone" not found'):
        _contents({"name": "v", "secret": {"secretName": "gone"}}, objects, tmp_path)
    with pytest.raises(volumes.VolumeError, match="couldn't find key nope"):
        _contents(
            {"name": "v", "configMap": {"name": "conf", "items": [{"key": "nope", "path": "n"}]}},
            objects,
            tmp_path,
        )


def test_projected_and_downward_volumes(tmp_path: Path) -> None:
    objects = {"kube-root-ca.crt": {"data": {"ca.crt": "PEM"}}}
    projected = _contents(
        {
            "name": "kube-api-access",
            "projected": {
                "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {
                        "configMap": {
                            "name": "kube-root-ca.crt",
                            "items": [{"key": "ca.crt", "path": "ca.crt"}],
                        }
                    },
                    {
                        "downwardAPI": {
                            "items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]
                        }
                    },
                ]
            },
        },
        objects,
        tmp_path,
    )
    assert projected == {
        "token": (b"token-None-3607", 0o644),
        "ca.crt": (b"PEM", 0o644),
        "namespace": (b"demo", 0o644),
    }
    downward = _contents(
        {
            "name": "d",
            "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]},
        },
        objects,
        tmp_path,
    )
    assert downward == {"labels": (b'app="web"\ntier="front"', 0o644)}


def test_volume_plan_keeps_host_paths_inside_the_state_dir(tmp_path: Path) -> None:
    pod = {
        **POD,
        "spec": {
            "volumes": [
                {"name": "scratch", "emptyDir": {}},
                {"name": "host", "hostPath": {"path": "/var/../etc/models"}},
                {"name": "claim", "persistentVolumeClaim": {"claimName": "cache"}},
            ]
        },
    }
    planned = volumes.plan(pod, tmp_path / "pod", tmp_path / "state")
    assert planned["scratch"].path == tmp_path / "pod" / "volumes" / "scratch"
    assert planned["host"].path == tmp_path / "state" / "hostpath" / "var" / "etc" / "models"
    assert planned["claim"].path == tmp_path / "state" / "pvc" / "demo" / "cache"
    for volume in planned.values():
        volumes.create(volume)
        assert volume.path.is_dir()


def test_sync_replaces_atomically_and_only_what_changed(tmp_path: Path) -> None:
    directory = tmp_path / "vol"
    assert volumes.sync(directory, {"a": (b"1", 0o644), "d/b": (b"2", 0o644)})
    a_inode = (directory / "a").stat().st_ino
    b_inode = (directory / "d" / "b").stat().st_ino
    assert not volumes.sync(directory, {"a": (b"1", 0o644), "d/b": (b"2", 0o644)})
    assert (directory / "a").stat().st_ino == a_inode  # unchanged: not rewritten
    assert volumes.sync(directory, {"a": (b"1", 0o644), "d/b": (b"3", 0o644)})
    assert (directory / "d" / "b").read_bytes() == b"3"
    assert (directory / "d" / "b").stat().st_ino != b_inode  # a new file renamed into place
    assert volumes.sync(directory, {"a": (b"1", 0o644)})
    assert sorted(p.name for p in directory.iterdir()) == ["a"]
    assert not list(directory.glob(".tmp-*"))


# -- runtime ------------------------------------------------------------------------------------


def test_spawner_reports_exits_and_kills_the_rest_of_the_group(tmp_path: Path) -> None:
    spawner = Spawner()
    try:
        exits: list[int] = []
        done = threading.Event()

        def exited(returncode: int) -> None:
            exits.append(returncode)
            done.set()

        pid_file = tmp_path / "child.pid"
        proc = spawner.spawn(
            ["sh", "-c", f"sleep 60 & echo $! > {pid_file}; echo hello; exit 3"],
            {"PATH": os.defpath},
            str(tmp_path),
            tmp_path / "logs" / "c.log",
            on_exit=exited,
        )
        assert done.wait(10) and exits == [3] and proc.returncode == 3
        child = int(pid_file.read_text())
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child)  # the background sleep died with its group
        assert (tmp_path / "logs" / "c.log").read_text() == "hello\n"

        sleeper = spawner.spawn(
            ["sleep", "60"], {"PATH": os.defpath}, str(tmp_path), tmp_path / "s.log", lambda rc: None
        )
        sleeper.signal_group(15)
        assert sleeper.wait(5) and sleeper.returncode == -15
    finally:
        spawner.close()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


# -- configuration ------------------------------------------------------------------------------


def test_cli_flags(tmp_path: Path) -> None:
    config = parse_args(
        [
            "--kubeconfig",
            str(tmp_path / "kc"),
            "--state-dir",
            str(tmp_path / "s"),
            "--nodes",
            "3",
            "--gpus",
            "4",
            "--gpu-resource",
            "amd.com/gpu",
            "--first-index",
            "5",
            "--crash-backoff-s",
            "1",
            "--inherit-env",
            "HF_HOME",
        ]
    )
    assert (config.nodes, config.gpus, config.gpu_resource, config.crash_backoff_s) == (
        3,
        4,
        "amd.com/gpu",
        1.0,
    )
    assert config.node_names() == [("gpu-node-5", 5), ("gpu-node-6", 6), ("gpu-node-7", 7)]
    assert "HF_HOME" in config.inherit_env
    with pytest.raises(ValueError, match="outside"):
        KubeletConfig(
            kubeconfig=tmp_path, state_dir=tmp_path, nodes=2, first_index=nodes.MAX_NODES - 1
        ).node_names()


def test_process_node_manifest() -> None:
    node = nodes.process_node("gpu-node-4", 4, gpus=2, gpu_resource="amd.com/gpu", now=T0)
    assert nodes.KWOK_ANNOTATION not in node["metadata"]["annotations"]
    labels = node["metadata"]["labels"]
    assert labels[nodes.NODE_KIND_LABEL] == "process" and labels[nodes.FAKE_NODE_LABEL] == "true"
    assert labels["nvidia.com/gpu.present"] == "true" and labels["kubernetes.io/hostname"] == "gpu-node-4"
    assert node["spec"]["podCIDR"] == "127.1.4.0/24"
    assert node["status"]["allocatable"] == {
        "cpu": "32",
        "memory": "256Gi",
        "pods": "110",
        "amd.com/gpu": "2",
    }
    ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True" and ready["lastHeartbeatTime"] == "2026-01-02T03:04:05Z"
    kwok = nodes.gpu_node("kwok-node-4", 4)
    assert kwok["metadata"]["annotations"][nodes.KWOK_ANNOTATION] == "fake"
    assert kwok["metadata"]["labels"][nodes.NODE_KIND_LABEL] == "kwok"


def test_heartbeats_come_every_interval_and_soon_again_after_a_failure() -> None:
    from imagefleet.devcluster.kubelet import heartbeat_delay

    assert heartbeat_delay(10.0, 0) == 10.0
    assert [heartbeat_delay(10.0, n) for n in range(1, 8)] == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 7.0]
    assert heartbeat_delay(0.5, 3) == 0.5  # never later than the interval itself
