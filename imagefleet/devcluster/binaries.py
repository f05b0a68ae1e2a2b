"""Where the control-plane binaries built by ``tools/k8s/build.sh`` live.

The build script keys its cache by the Kubernetes version pinned in
``tools/k8s/kubernetes/go.mod``; this module computes the same directory so the harness and
``make k8s-tools`` agree without a second copy of the version:

* ``IMAGEFLEET_K8S_BIN`` names the bin directory outright (any layout, e.g. a shared install);
* otherwise ``${IMAGEFLEET_K8S_CACHE:-${XDG_CACHE_HOME:-~/.cache}/imagefleet}/k8s-<version>/bin``.

The KWOK stage config sits beside it in ``../etc/kwok-stages.yaml``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

BINARIES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "kubectl",
    "helm",
)

REPO_ROOT = Path(__file__).resolve().parents[2]
KUBERNETES_GO_MOD = REPO_ROOT / "tools" / "k8s" / "kubernetes" / "go.mod"

_REQUIRE = re.compile(r"^\s*(?:require\s+)?k8s\.io/kubernetes\s+(v\S+)", re.MULTILINE)


def kubernetes_version(go_mod: Path = KUBERNETES_GO_MOD) -> str:
    """The k8s.io/kubernetes version the wrapper module requires, e.g. ``v1.36.3``."""
    try:
        text = go_mod.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{go_mod} not found: run from an imagefleet checkout or set IMAGEFLEET_K8S_BIN"
        ) from None
    match = _REQUIRE.search(text)
    if match is None:
        raise ValueError(f"{go_mod} does not require k8s.io/kubernetes")
    return match.group(1)


def default_bin_dir() -> Path:
    """The directory ``make k8s-tools`` builds into, honouring the environment overrides."""
    explicit = os.environ.get("IMAGEFLEET_K8S_BIN")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    root = Path(os.environ.get("IMAGEFLEET_K8S_CACHE") or Path(xdg) / "imagefleet").expanduser()
    return root / f"k8s-{kubernetes_version()}" / "bin"


def kwok_stages(bin_dir: Path) -> Path:
    """The KWOK stage config written next to the binaries by the build."""
    return bin_dir.parent / "etc" / "kwok-stages.yaml"


def missing(bin_dir: Path) -> list[str]:
    """Names of the artifacts a control plane needs that ``bin_dir`` lacks (empty when complete)."""
    absent = [name for name in BINARIES if not os.access(bin_dir / name, os.X_OK)]
    if not kwok_stages(bin_dir).is_file():
        absent.append(str(kwok_stages(bin_dir).relative_to(bin_dir.parent)))
    return absent
