"""A real Kubernetes control plane on loopback, for tests and for people.

Start order: etcd -> kube-apiserver -> kube-controller-manager, kube-scheduler -> KWOK -> the
process kubelet (which registers the process nodes ``gpu-node-<i>``) -> KWOK nodes
(``kwok-node-<i>``, indices after the process nodes). Each step waits for the component's health
endpoint (or, for nodes, their Ready condition) and fails with the component, the URL and the
tail of its log. Everything a control plane owns lives in one state directory::

    pki/          CA, apiserver serving cert, admin client cert, service-account key
    etcd/         etcd data
    certs/<c>/    self-signed serving certs the components make for themselves
    kubelet/      the process kubelet's pods: logs, volumes, service-account files
    logs/<c>.log  one log per component
    kubeconfig    admin credentials (group system:masters)
    state.json    bin dir and the (name, pid, start time, log) of every process

The state file is written after every start, so a half-started plane can still be stopped. Used
from pytest (``tests/cluster/conftest.py``) and by hand::

    python -m imagefleet.devcluster up     # start (detached) and print export lines
    python -m imagefleet.devcluster env    # print them again
    python -m imagefleet.devcluster down   # stop and remove the state directory
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import shutil
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagefleet.devcluster import binaries, components, nodes
from imagefleet.devcluster.pki import Pki, create_pki
from imagefleet.devcluster.processes import (
    ProcessRecord,
    StartupError,
    free_ports,
    is_running,
    start,
    stop,
    wait_ready,
)

STATE_FILE = "state.json"


@dataclass(frozen=True)
class Settings:
    """Everything that shapes one control plane."""

    state_dir: Path
    bin_dir: Path = field(default_factory=binaries.default_bin_dir)
    gpu_nodes: int = 2  # process nodes, run by the process kubelet
    gpus_per_node: int = 8
    gpu_resource: str = "nvidia.com/gpu"
    kwok_nodes: int = 0  # KWOK nodes (nothing runs on them), for scale work
    first_node_index: int = 0
    """Index of the first node: it picks node names and pod IPs (127.1.<index>.x), so two planes on
    one machine with disjoint index ranges never hand out the same pod address."""
    crash_backoff_s: float = 10.0  # the process kubelet's first CrashLoopBackOff delay
    detach: bool = False  # own session: the processes outlive the Python process that started them
    start_timeout: float = 90.0
    stop_timeout: float = 10.0


def default_state_dir() -> Path:
    """Where ``cluster-up`` keeps its cluster: ``$IMAGEFLEET_CLUSTER_DIR`` or the user cache."""
    explicit = os.environ.get("IMAGEFLEET_CLUSTER_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "imagefleet" / "cluster"


def node_name(index: int) -> str:
    """The name of process node ``index``."""
    return f"gpu-node-{index}"


def kwok_node_name(index: int) -> str:
    return f"kwok-node-{index}"


class ControlPlane:
    """One control plane: start it, hand out credentials, stop it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._launched: dict[str, tuple[list[str], str, Callable[[], str | None]]] = {}
        self.processes: list[ProcessRecord] = []
        self.node_names: list[str] = []

    # -- paths and credentials ------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self.settings.state_dir

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    def binary(self, name: str) -> Path:
        return self.settings.bin_dir / name

    def env(self) -> dict[str, str]:
        """KUBECONFIG, and PATH with the built kubectl and helm first."""
        path = os.environ.get("PATH", "")
        return {"KUBECONFIG": str(self.kubeconfig), "PATH": f"{self.settings.bin_dir}{os.pathsep}{path}"}

    def export_lines(self) -> str:
        """Shell lines that point kubectl and helm at this control plane."""
        return (
            f"export KUBECONFIG={shlex.quote(str(self.kubeconfig))}\n"
            f'export PATH={shlex.quote(str(self.settings.bin_dir))}:"$PATH"'
        )

    def api_client(self) -> Any:
        """A ``kubernetes`` client configured from this plane's kubeconfig."""
        from kubernetes import config

        new_client: Callable[..., Any] = config.new_client_from_config
        return new_client(config_file=str(self.kubeconfig))

    def running(self) -> bool:
        """True while every recorded process is alive."""
        return bool(self.processes) and all(is_running(p) for p in self.processes)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Start every component and the fake nodes; on failure stop what started and re-raise."""
        s = self.settings
        if (
            s.gpu_nodes < 0
            or s.kwok_nodes < 0
            or s.first_node_index < 0
            or s.first_node_index + s.gpu_nodes + s.kwok_nodes > nodes.MAX_NODES
        ):
            raise ValueError(f"{s.gpu_nodes} process + {s.kwok_nodes} KWOK nodes: at most {nodes.MAX_NODES}")
        absent = binaries.missing(self.settings.bin_dir)
        if absent:
            raise FileNotFoundError(
                f"missing in {self.settings.bin_dir}: {', '.join(absent)} (run `make k8s-tools`)"
            )
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the processes in reverse start order: SIGTERM, wait, SIGKILL."""
        for record in reversed(self.processes):
            stop(record, self.settings.stop_timeout)
        self.processes = []
        if self.state_dir.is_dir():
            self._save()

    def _start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        pki = create_pki(self.state_dir / "pki")
        ports = components.Ports(*free_ports(7))
        bin_dir = self.settings.bin_dir
        self._launch(
            "etcd",
            components.etcd(bin_dir, self.state_dir / "etcd", ports),
            f"{ports.etcd_url}/health",
            body_ok=_etcd_healthy,
        )
        self._launch(
            "kube-apiserver",
            components.apiserver(bin_dir, pki, self._certs("apiserver"), ports),
            f"{ports.apiserver_url}/readyz",
            context=_client_context(pki),
        )
        self.kubeconfig.write_text(components.kubeconfig_json(pki, ports))
        self._launch(
            "kube-controller-manager",
            components.controller_manager(bin_dir, pki, self.kubeconfig, self._certs("kcm"), ports),
            f"https://127.0.0.1:{ports.controller_manager}/healthz",
            context=_insecure_context(),
        )
        self._launch(
            "kube-scheduler",
            components.scheduler(bin_dir, self.kubeconfig, self._certs("scheduler"), ports),
            f"https://127.0.0.1:{ports.scheduler}/healthz",
            context=_insecure_context(),
        )
        self._launch(
            "kwok",
            components.kwok(bin_dir, binaries.kwok_stages(bin_dir), self.kubeconfig, ports),
            f"http://127.0.0.1:{ports.kwok}/healthz",
        )
        s = self.settings
        self._launch(
            "kubelet",
            components.kubelet(
                self.kubeconfig,
                self.state_dir / "kubelet",
                ports,
                nodes=s.gpu_nodes,
                gpus=s.gpus_per_node,
                gpu_resource=s.gpu_resource,
                crash_backoff_s=s.crash_backoff_s,
                first_index=s.first_node_index,
            ),
            f"http://127.0.0.1:{ports.kubelet}/healthz",
        )
        self._add_nodes()

    def _launch(
        self,
        name: str,
        argv: list[str],
        url: str,
        *,
        body_ok: Callable[[bytes], bool] | None = None,
        context: ssl.SSLContext | None = None,
    ) -> None:
        """Start one component and wait until ``url`` answers 200 (and ``body_ok`` accepts it)."""
        record = start(name, argv, self.logs_dir / f"{name}.log", detach=self.settings.detach)
        self.processes.append(record)
        self._save()
        probe = _http_probe(url, context, body_ok)
        self._launched[name] = (list(argv), url, probe)
        wait_ready(record, url, probe, self.settings.start_timeout)

    def restart(self, *names: str, downtime_s: float = 0.0) -> None:
        """Stop the named components as a crash would (SIGTERM, SIGKILL after 2 s; the last started
        first), keep them down for ``downtime_s`` seconds, start them again in start order with the
        same command lines and wait until each is healthy.

        For tests of what survives an apiserver (or scheduler, kubelet...) restart; only for a
        plane started by this object. A control-plane node that reboots takes the apiserver, the
        controller-manager and the scheduler down together: restart them together to play it. A
        controller-manager left running through a long apiserver outage behaves as upstream's
        does and is slow to recover: its informers back off relisting for up to 30 s, and its
        node lifecycle controller meanwhile judges the nodes by leases it has not seen renewed,
        marks them unreachable and their pods not Ready.
        """
        order = [p.name for p in self.processes]
        unknown = [n for n in names if n not in order]
        if unknown or not names:
            raise ValueError(f"no component named {', '.join(unknown) or '(none given)'}; have {order}")
        chosen = sorted(set(names), key=order.index)
        for name in reversed(chosen):
            stop(self.processes[order.index(name)], 2.0)
        time.sleep(downtime_s)
        for name in chosen:
            index = order.index(name)
            argv, url, probe = self._launched[name]
            new = start(name, argv, self.processes[index].log, detach=self.settings.detach)
            self.processes[index] = new
            self._save()
            wait_ready(new, url, probe, self.settings.start_timeout)

    def _add_nodes(self) -> None:
        """Create the KWOK nodes and wait until every node (process and KWOK) is Ready."""
        from kubernetes import client

        s = self.settings
        first = s.first_node_index
        process_nodes = [node_name(first + i) for i in range(s.gpu_nodes)]
        with self.api_client() as api:
            core = client.CoreV1Api(api)
            manifests = (
                nodes.gpu_node(kwok_node_name(i), i, s.gpus_per_node, s.gpu_resource)
                for i in range(first + s.gpu_nodes, first + s.gpu_nodes + s.kwok_nodes)
            )
            self.node_names = process_nodes + nodes.create(core, manifests)
            self._save()
            for component, names in (("kubelet", process_nodes), ("kwok", self.node_names[s.gpu_nodes :])):
                record = next(p for p in self.processes if p.name == component)
                wait_ready(
                    record,
                    "(Node Ready conditions)",
                    functools.partial(nodes.not_ready, core, names),
                    s.start_timeout,
                )
        self._save()

    def _certs(self, component: str) -> Path:
        path = self.state_dir / "certs" / component
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- persistence ----------------------------------------------------------------------

    def _save(self) -> None:
        state = {
            "bin_dir": str(self.settings.bin_dir),
            "nodes": self.node_names,
            "processes": [p.to_json() for p in self.processes],
        }
        tmp = self.state_dir / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_dir / STATE_FILE)

    @classmethod
    def load(cls, state_dir: Path) -> ControlPlane | None:
        """The control plane recorded in ``state_dir``, or None if there is none."""
        try:
            state = json.loads((state_dir / STATE_FILE).read_text())
        except FileNotFoundError:
            return None
        plane = cls(Settings(state_dir=state_dir, bin_dir=Path(state["bin_dir"]), detach=True))
        plane.processes = [ProcessRecord.from_json(p) for p in state["processes"]]
        plane.node_names = list(state.get("nodes", []))
        return plane


# -- health probes ----------------------------------------------------------------------------


def _http_probe(
    url: str, context: ssl.SSLContext | None, body_ok: Callable[[bytes], bool] | None
) -> Callable[[], str | None]:
    def probe() -> str | None:
        try:
            with urllib.request.urlopen(url, context=context, timeout=2) as response:
                body: bytes = response.read()
        except urllib.error.HTTPError as err:
            return f"HTTP {err.code}: {err.read()[-300:].decode(errors='replace').strip()}"
        except (urllib.error.URLError, OSError) as err:
            return str(err)
        if body_ok is not None and not body_ok(body):
            return f"unhealthy: {body[:300].decode(errors='replace')}"
        return None

    return probe


def _etcd_healthy(body: bytes) -> bool:
    return bool(json.loads(body).get("health") == "true")


def _client_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
    return context


def _insecure_context() -> ssl.SSLContext:
    """For kcm and scheduler health: self-signed loopback certs, nothing secret is sent."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# -- command line -----------------------------------------------------------------------------


def _up(state_dir: Path, args: argparse.Namespace) -> int:
    existing = ControlPlane.load(state_dir)
    if existing is not None and existing.running():
        print(f"control plane already running in {state_dir}", file=sys.stderr)
        print(existing.export_lines())
        return 0
    if existing is not None:
        existing.stop()
    shutil.rmtree(state_dir, ignore_errors=True)
    settings = Settings(
        state_dir=state_dir,
        gpu_nodes=args.nodes,
        gpus_per_node=args.gpus,
        kwok_nodes=args.kwok_nodes,
        crash_backoff_s=args.crash_backoff_s,
        first_node_index=args.first_node_index,
        detach=True,
    )
    plane = ControlPlane(settings)
    print(f"starting control plane in {state_dir} ...", file=sys.stderr)
    try:
        plane.start()
    except (StartupError, FileNotFoundError) as err:
        print(f"error: {err}\nlogs kept in {plane.logs_dir}", file=sys.stderr)
        return 1
    print(
        f"ready: {args.nodes} process nodes and {args.kwok_nodes} KWOK nodes with {args.gpus} GPUs each;"
        f" logs in {plane.logs_dir}, pod logs in {plane.state_dir / 'kubelet' / 'pods'}",
        file=sys.stderr,
    )
    print(plane.export_lines())
    return 0


def _down(state_dir: Path) -> int:
    plane = ControlPlane.load(state_dir)
    if plane is None:
        print(f"no control plane recorded in {state_dir}", file=sys.stderr)
        return 0
    plane.stop()
    shutil.rmtree(state_dir, ignore_errors=True)
    print(f"control plane in {state_dir} stopped", file=sys.stderr)
    return 0


def _env(state_dir: Path) -> int:
    plane = ControlPlane.load(state_dir)
    if plane is None or not plane.running():
        print(f"no running control plane in {state_dir} (start one with `make cluster-up`)", file=sys.stderr)
        return 1
    print(plane.export_lines())
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m imagefleet.devcluster") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=("up", "down", "env"))
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="default: $IMAGEFLEET_CLUSTER_DIR or ~/.cache/imagefleet/cluster",
    )
    parser.add_argument(
        "--nodes", type=int, default=2, help="process nodes, run by the process kubelet (up only)"
    )
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node (up only)")
    parser.add_argument(
        "--first-node-index",
        type=int,
        default=0,
        help="index of the first node: node names and pod IPs 127.1.<index>.x (up only)",
    )
    parser.add_argument(
        "--kwok-nodes",
        type=int,
        default=0,
        help="KWOK nodes, where no process runs, for scale work (up only)",
    )
    parser.add_argument(
        "--crash-backoff-s",
        type=float,
        default=10.0,
        help="first CrashLoopBackOff delay of the process kubelet",
    )
    args = parser.parse_args(argv)
    state_dir = (args.state_dir or default_state_dir()).expanduser().resolve()
    if args.command == "up":
        return _up(state_dir, args)
    if args.command == "down":
        return _down(state_dir)
    return _env(state_dir)


if __name__ == "__main__":
    sys.exit(main())
