"""``make cluster-up`` / ``cluster-down``: a control plane that outlives the command that started it.

Drives ``python -m imagefleet.devcluster`` exactly as the make targets do, in a state
directory of the test's own, and uses the printed export lines the way a user pastes them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from imagefleet.devcluster.processes import ProcessRecord, is_running
from imagefleet.testing.wait import until

REPO = Path(__file__).resolve().parents[2]


def _cli(command: str, state_dir: Path, bin_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "imagefleet.devcluster", command, "--state-dir", str(state_dir)]
    env = {**os.environ, "IMAGEFLEET_K8S_BIN": str(bin_dir)}
    env.pop("KUBECONFIG", None)
    return subprocess.run(
        [*argv, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=150, check=False
    )


def _in_shell(exports: str, script: str, home: Path) -> str:
    """Run ``script`` in bash after the export lines, as in a user's terminal (helm's files in ``home``)."""
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env.update({f"HELM_{kind}_HOME": str(home / kind.lower()) for kind in ("CACHE", "CONFIG", "DATA")})
    result = subprocess.run(
        ["bash", "-c", f"{exports}\n{script}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _records(state_dir: Path) -> list[ProcessRecord]:
    state = json.loads((state_dir / "state.json").read_text())
    return [ProcessRecord.from_json(p) for p in state["processes"]]


def test_up_outlives_the_command_and_down_stops_it(tmp_path: Path, bin_dir: Path) -> None:
    state_dir = tmp_path / "cluster"
    up = _cli("up", state_dir, bin_dir, "--nodes", "1", "--gpus", "4", "--kwok-nodes", "1")
    assert up.returncode == 0, up.stderr
    try:
        lines = up.stdout.splitlines()
        assert [line.split("=")[0] for line in lines] == ["export KUBECONFIG", "export PATH"]
        records = _records(state_dir)
        assert [r.name for r in records] == [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kwok",
            "kubelet",
        ]
        assert all(is_running(r) for r in records)  # the `up` process has exited; they have not

        found = _in_shell(up.stdout, "command -v kubectl helm", tmp_path).split()
        assert found == [str(bin_dir / "kubectl"), str(bin_dir / "helm")]
        nodes = json.loads(_in_shell(up.stdout, "kubectl get nodes -o json", tmp_path))["items"]
        assert [n["metadata"]["name"] for n in nodes] == ["gpu-node-0", "kwok-node-1"]
        kinds = [n["metadata"]["labels"]["imagefleet.dev/node-kind"] for n in nodes]
        assert kinds == ["process", "kwok"]  # run by the process kubelet and by KWOK
        assert all(n["status"]["allocatable"]["nvidia.com/gpu"] == "4" for n in nodes)
        assert json.loads(_in_shell(up.stdout, "helm list --all-namespaces -o json", tmp_path)) == []

        assert _cli("env", state_dir, bin_dir).stdout == up.stdout
        again = _cli("up", state_dir, bin_dir)
        assert again.returncode == 0 and "already running" in again.stderr
        assert _records(state_dir) == records
    finally:
        down = _cli("down", state_dir, bin_dir)

    assert down.returncode == 0, down.stderr
    assert not state_dir.exists()
    until(lambda: not any(is_running(r) for r in records), timeout=20, what="control-plane processes gone")
    gone = _cli("env", state_dir, bin_dir)
    assert gone.returncode == 1 and "no running control plane" in gone.stderr
