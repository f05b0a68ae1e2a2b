"""Fixtures for tests against a real control plane (see imagefleet.devcluster.controlplane).

One control plane per pytest session; each test gets a fresh namespace. Every test in this folder
carries the ``cluster`` marker, so ``pytest -m "not cluster"`` leaves them out.

Without built binaries the tests skip, unless IMAGEFLEET_REQUIRE_CLUSTER is set (``make test``
sets it): then they fail, so a broken build can never turn into a quietly skipped suite. When
any test of the session failed, the control plane's directory (logs, kubeconfig) is kept and its
path printed at the end of the run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from imagefleet.devcluster import binaries
from imagefleet.devcluster.controlplane import ControlPlane, Settings
from imagefleet.testing.wait import until

HERE = Path(__file__).resolve().parent
_KEPT_DIR = pytest.StashKey[Path]()
_PLANE_DIR = pytest.StashKey[Path]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test below this folder ``cluster`` (the hook sees the whole session's items)."""
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def bin_dir() -> Path:
    """The built binaries; skips (or fails, under IMAGEFLEET_REQUIRE_CLUSTER) when any is missing."""
    path = binaries.default_bin_dir()
    absent = binaries.missing(path)
    if absent:
        message = f"control-plane binaries missing in {path}: {', '.join(absent)}; run `make k8s-tools`"
        if os.environ.get("IMAGEFLEET_REQUIRE_CLUSTER"):
            pytest.fail(message + " (IMAGEFLEET_REQUIRE_CLUSTER is set)", pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def control_plane(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, bin_dir: Path
) -> Iterator[ControlPlane]:
    """One control plane for the session; its directory is kept when any test failed."""
    state_dir = tmp_path_factory.mktemp("control-plane")
    request.config.stash[_PLANE_DIR] = state_dir
    # Two test sessions on one machine keep their pod IPs apart with IMAGEFLEET_TEST_FIRST_NODE.
    first = int(os.environ.get("IMAGEFLEET_TEST_FIRST_NODE", "0"))
    plane = ControlPlane(Settings(state_dir=state_dir, bin_dir=bin_dir, first_node_index=first))
    try:
        plane.start()
        yield plane
    finally:
        plane.stop()
        if request.session.testsfailed:
            request.config.stash[_KEPT_DIR] = state_dir
        else:
            shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def api_client(control_plane: ControlPlane) -> Iterator[Any]:
    with control_plane.api_client() as api:
        yield api


@pytest.fixture(scope="session")
def core_v1(api_client: Any) -> Any:
    from kubernetes import client

    return client.CoreV1Api(api_client)


@pytest.fixture
def namespace(request: pytest.FixtureRequest, core_v1: Any) -> Iterator[str]:
    """A fresh namespace, usable once its ``default`` ServiceAccount exists; deleted afterwards."""
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{stem}-{uuid.uuid4().hex[:6]}"
    core_v1.create_namespace({"metadata": {"name": name}})
    until(
        lambda: any(
            sa.metadata.name == "default" for sa in core_v1.list_namespaced_service_account(name).items
        ),
        timeout=30,
        what=f"ServiceAccount {name}/default (created by kube-controller-manager)",
    )
    yield name
    core_v1.delete_namespace(name)


class Tools:
    """Runs the built kubectl and helm against the session's control plane."""

    def __init__(self, plane: ControlPlane, home: Path) -> None:
        self.plane = plane
        self.env = {
            **os.environ,
            **plane.env(),
            "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_CONFIG_HOME": str(home / "config"),
            "HELM_DATA_HOME": str(home / "data"),
        }

    def run(
        self, tool: str, args: Sequence[str], *, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(self.plane.binary(tool)), *args]
        result = subprocess.run(argv, input=stdin, env=self.env, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {result.returncode}:\n{result.stderr}{result.stdout}"
            )
        return result

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.run("kubectl", args, stdin=stdin, check=check)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("helm", args, check=check)


@pytest.fixture(scope="session")
def tools(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Tools:
    return Tools(control_plane, tmp_path_factory.mktemp("tool-home"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    plane_dir = item.config.stash.get(_PLANE_DIR, None)
    if report.failed and plane_dir is not None:
        report.sections.append(
            ("control plane", f"component logs: {plane_dir / 'logs'} (kept: a test failed)")
        )
    return report


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    kept = config.stash.get(_KEPT_DIR, None)
    if kept is not None:
        terminalreporter.write_line(f"control plane kept for inspection: {kept} (logs in {kept / 'logs'})")


@pytest.fixture(scope="session")
def imagegenerator_crd(tools: Tools) -> str:
    """The repository's ImageGenerator CRD, installed once and Established; its name."""
    crd = HERE.parents[1] / "crds" / "imagegenerator.yaml"
    tools.kubectl("apply", "--server-side", "-f", str(crd))
    tools.kubectl(
        "wait", "--for=condition=Established", "crd/imagegenerators.imagefleet.dev", "--timeout=60s"
    )
    return "imagegenerators.imagefleet.dev"
