"""``make demo``: from nothing to an image through an in-cluster router, in one command.

1. start the local control plane (or reuse the one ``make cluster-up`` started): real etcd,
   apiserver, controller-manager and scheduler, with process nodes whose kubelet runs each pod's
   real command from this checkout;
2. ``helm install`` the chart: the operator runs as the chart's Deployment, under the chart's
   ServiceAccount and ClusterRole, exactly as on a real cluster;
3. ``kubectl apply -f examples/tiny.yaml`` and wait for ``Ready``;
4. print the ``curl`` line that gets an image through the router pod, and how to clean up.

    python -m imagefleet.devcluster.demo [--state-dir DIR] [--first-node-index N]

The cluster stays up afterwards (``make cluster-down`` stops it); running the demo again reuses it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from imagefleet.devcluster import binaries
from imagefleet.devcluster.controlplane import ControlPlane, Settings, default_state_dir
from imagefleet.devcluster.processes import StartupError

RELEASE = "imagefleet"
SYSTEM_NAMESPACE = "imagefleet-system"
EXAMPLE = "tiny"
READY_TIMEOUT_S = 600


class DemoError(RuntimeError):
    """A step failed; the message says which and shows the tool's output."""


def _run(plane: ControlPlane, tool: str, *args: str, stdin: str | None = None, timeout: float = 300) -> str:
    env = {**os.environ, **plane.env()}
    env.update(
        {
            f"HELM_{kind}_HOME": str(plane.state_dir / "helm" / kind.lower())
            for kind in ("CACHE", "CONFIG", "DATA")
        }
    )
    argv = [str(plane.binary(tool)), *args]
    result = subprocess.run(argv, env=env, input=stdin, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise DemoError(f"{tool} {' '.join(args)} failed:\n{result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def say(text: str) -> None:
    print(f"demo: {text}", file=sys.stderr, flush=True)


def ensure_plane(state_dir: Path, first_node_index: int) -> ControlPlane:
    plane = ControlPlane.load(state_dir)
    if plane is not None and plane.running():
        say(f"using the control plane already running in {state_dir}")
        return plane
    if plane is not None:
        plane.stop()
    say(f"starting a control plane in {state_dir} (about 30 s)")
    plane = ControlPlane(Settings(state_dir=state_dir, detach=True, first_node_index=first_node_index))
    plane.start()
    return plane


def install_chart(plane: ControlPlane) -> None:
    chart = binaries.REPO_ROOT / "charts" / "imagefleet"
    say(f"helm upgrade --install {RELEASE} {chart.relative_to(binaries.REPO_ROOT)} -n {SYSTEM_NAMESPACE}")
    _run(
        plane,
        "helm",
        "upgrade",
        "--install",
        RELEASE,
        str(chart),
        "--namespace",
        SYSTEM_NAMESPACE,
        "--create-namespace",
        "--wait",
        "--timeout",
        "5m",
    )


def apply_example(plane: ControlPlane) -> None:
    example = binaries.REPO_ROOT / "examples" / f"{EXAMPLE}.yaml"
    say(f"kubectl apply -f {example.relative_to(binaries.REPO_ROOT)}")
    _run(plane, "kubectl", "apply", "-f", str(example))
    say(f"waiting for imggen/{EXAMPLE} to be Ready (the pods load the model and warm up)")
    _run(
        plane,
        "kubectl",
        "wait",
        "--for=condition=Ready",
        f"imggen/{EXAMPLE}",
        f"--timeout={READY_TIMEOUT_S}s",
        timeout=READY_TIMEOUT_S + 30,
    )


def router_address(plane: ControlPlane) -> str:
    """The IP of a ready router pod (the test cluster has no kube-proxy: Services are not routed)."""
    deadline = time.monotonic() + 120
    selector = f"imagefleet.dev/generator={EXAMPLE},app.kubernetes.io/component=router"
    while True:
        pods = json.loads(_run(plane, "kubectl", "get", "pods", "-l", selector, "-o", "json"))["items"]
        for pod in pods:
            conditions = pod.get("status", {}).get("conditions") or []
            if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                return str(pod["status"]["podIP"])
        if time.monotonic() > deadline:
            raise DemoError("no router pod became Ready")
        time.sleep(1)


def instructions(plane: ControlPlane, ip: str) -> str:
    url = f"http://{ip}:8000"
    return f"""
imagefleet is running on the local cluster: the operator (from the Helm chart), ImageGenerator
`{EXAMPLE}` with its inference pods, and a router.

  {plane.export_lines().replace(chr(10), chr(10) + "  ")}
  kubectl get imggen -o wide          # replicas, ready pods, queue, images per minute
  kubectl describe imggen {EXAMPLE}          # conditions, per-pod entries, events

Get an image through the router pod (on a real cluster you would use the Service
{EXAMPLE}-router, e.g. with kubectl port-forward svc/{EXAMPLE}-router 8000:80):

  curl -s {url}/v1/images/generations -H 'Content-Type: application/json' \\
    -d '{{"prompt": "a lighthouse at dusk", "size": "64x64"}}' \\
    | python3 -c 'import base64,json,sys; open("demo.png","wb").write(base64.b64decode(json.load(sys.stdin)["data"][0]["b64_json"]))'

or with the openai client: OpenAI(base_url="{url}/v1", api_key="unused").images.generate(prompt="a fox")

Stop everything with: make cluster-down
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m imagefleet.devcluster.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--state-dir", type=Path, default=None, help="default: the cluster-up directory")
    parser.add_argument(
        "--first-node-index", type=int, default=0, help="see `python -m imagefleet.devcluster -h`"
    )
    args = parser.parse_args(argv)
    state_dir = (args.state_dir or default_state_dir()).expanduser().resolve()
    try:
        plane = ensure_plane(state_dir, args.first_node_index)
        install_chart(plane)
        apply_example(plane)
        ip = router_address(plane)
    except (DemoError, StartupError, FileNotFoundError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    print(instructions(plane, ip))
    return 0


if __name__ == "__main__":
    sys.exit(main())
