"""Pod volumes as host directories.

Every volume of a pod becomes one directory; the container's ``volumeMounts`` then map mount paths
to those directories (see :mod:`.podspec` for the rewriting of argv and environment):

=====================  ==================================================================
secret, configMap      ``<pod>/volumes/<name>``: one file per key (``items`` pick keys and
                       paths), re-synced while the pod runs
projected              the same directory, from its secret, configMap, downwardAPI and
                       serviceAccountToken sources
downwardAPI            the same, from fieldRef items
emptyDir, ephemeral    ``<pod>/volumes/<name>``, empty (``medium: Memory`` is a directory too)
hostPath               ``<state-dir>/hostpath/<path>``: nothing is written outside the state dir
persistentVolumeClaim  ``<state-dir>/pvc/<namespace>/<claimName>``, kept across pods, like a PV
=====================  ==================================================================

Files are replaced atomically (a temporary file in the same directory, then ``rename``), so a
reader sees the old content or the new one, never half a file; a file whose content did not
change is not rewritten (its mtime stays).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from imagefleet.devcluster.podspec import ConfigError, field_value, resource_value

log = logging.getLogger(__name__)

# (namespace, name) -> the object as the API returns it, or None when it does not exist.
ObjectLookup = Callable[[str, str], Mapping[str, Any] | None]
# (audience or None, expirationSeconds) -> a service-account token for the pod.
TokenSource = Callable[[str | None, int], str]
Files = dict[str, tuple[bytes, int]]  # relative path -> (content, mode)

SYNCED = ("secret", "configMap", "projected", "downwardAPI")
DEFAULT_MODE = 0o644


class VolumeError(Exception):
    """A volume cannot be set up yet (missing object or key); the pod waits and retries."""


@dataclass(frozen=True)
class Volume:
    """One volume of a pod and the host directory that backs it."""

    name: str
    kind: str
    path: Path
    spec: Mapping[str, Any]

    @property
    def synced(self) -> bool:
        return self.kind in SYNCED


def plan(pod: Mapping[str, Any], pod_dir: Path, state_dir: Path) -> dict[str, Volume]:
    """The host directory of every volume of ``pod``."""
    namespace = pod["metadata"]["namespace"]
    planned = {}
    for spec in (pod.get("spec") or {}).get("volumes") or []:
        name = spec["name"]
        kind = next((k for k in spec if k != "name"), "emptyDir")
        if kind == "hostPath":
            path = state_dir / "hostpath" / _relative(spec["hostPath"].get("path", ""))
        elif kind == "persistentVolumeClaim":
            path = state_dir / "pvc" / namespace / _relative(spec[kind].get("claimName", ""))
        else:
            if kind not in (*SYNCED, "emptyDir", "ephemeral"):
                log.warning("volume %s: %s is not emulated; it is an empty directory", name, kind)
            path = pod_dir / "volumes" / name
        planned[name] = Volume(name=name, kind=kind, path=path, spec=spec)
    return planned


def _relative(path: str) -> str:
    parts = [p for p in PurePosixPath(path).parts if p not in ("/", "", ".", "..")]
    return str(PurePosixPath(*parts)) if parts else "root"


def create(volume: Volume) -> None:
    """Create the directory of a non-synced volume (hostPath of a file type gets its parent)."""
    if volume.kind == "hostPath" and volume.spec["hostPath"].get("type") in ("File", "FileOrCreate"):
        volume.path.parent.mkdir(parents=True, exist_ok=True)
        if volume.spec["hostPath"].get("type") == "FileOrCreate":
            volume.path.touch(exist_ok=True)
        return
    volume.path.mkdir(parents=True, exist_ok=True)


def contents(
    volume: Volume,
    pod: Mapping[str, Any],
    *,
    secret: ObjectLookup,
    config_map: ObjectLookup,
    token: TokenSource,
    pod_ip: str,
    host_ip: str,
) -> Files:
    """The files a synced volume holds right now. Raises :class:`VolumeError` when a required
    object or key is missing."""
    namespace = pod["metadata"]["namespace"]
    spec = volume.spec[volume.kind] or {}
    default_mode = int(spec.get("defaultMode", DEFAULT_MODE))
    if volume.kind == "secret":
        return _keyed("secret", secret(namespace, spec.get("secretName", "")), spec, default_mode)
    if volume.kind == "configMap":
        return _keyed("configmap", config_map(namespace, spec.get("name", "")), spec, default_mode)
    if volume.kind == "downwardAPI":
        return _downward(spec.get("items") or [], pod, pod_ip, host_ip, default_mode)
    files: Files = {}
    for source in spec.get("sources") or []:
        if "secret" in source:
            ref = source["secret"]
            files.update(_keyed("secret", secret(namespace, ref.get("name", "")), ref, default_mode))
        elif "configMap" in source:
            ref = source["configMap"]
            files.update(_keyed("configmap", config_map(namespace, ref.get("name", "")), ref, default_mode))
        elif "downwardAPI" in source:
            items = source["downwardAPI"].get("items") or []
            files.update(_downward(items, pod, pod_ip, host_ip, default_mode))
        elif "serviceAccountToken" in source:
            ref = source["serviceAccountToken"]
            expiration = int(ref.get("expirationSeconds") or 3600)
            text = token(ref.get("audience") or None, expiration)
            files[_safe(ref.get("path") or "token")] = (text.encode(), default_mode)
        else:
            log.warning("volume %s: projected source %s is not emulated", volume.name, sorted(source))
    return files


def _keyed(what: str, obj: Mapping[str, Any] | None, ref: Mapping[str, Any], default_mode: int) -> Files:
    name = ref.get("secretName") or ref.get("name")
    if obj is None:
        if ref.get("optional"):
            return {}
        raise VolumeError(f'{what} "{name}" not found')
    data: dict[str, bytes] = {}
    if what == "secret":
        data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    else:
        data = {k: str(v).encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    items = ref.get("items")
    if not items:
        return {_safe(k): (v, default_mode) for k, v in data.items()}
    files: Files = {}
    for item in items:
        key = item.get("key", "")
        if key not in data:
            if ref.get("optional"):
                continue
            raise VolumeError(f'couldn\'t find key {key} in {what} "{name}"')
        files[_safe(item.get("path") or key)] = (data[key], int(item.get("mode", default_mode)))
    return files


def _downward(items: Any, pod: Mapping[str, Any], pod_ip: str, host_ip: str, default_mode: int) -> Files:
    files: Files = {}
    containers = {c["name"]: c for c in (pod.get("spec") or {}).get("containers") or []}
    for item in items:
        mode = int(item.get("mode", default_mode))
        try:
            if "fieldRef" in item:
                text = field_value(pod, item["fieldRef"].get("fieldPath", ""), pod_ip, host_ip)
            elif "resourceFieldRef" in item:
                ref = item["resourceFieldRef"]
                container = containers.get(ref.get("containerName", ""), {})
                text = resource_value(container, ref.get("resource", ""), ref.get("divisor"))
            else:
                continue
        except ConfigError as err:
            raise VolumeError(str(err)) from None
        files[_safe(item.get("path", ""))] = (text.encode(), mode)
    return files


def _safe(path: str) -> str:
    parts = PurePosixPath(path).parts
    if not parts or PurePosixPath(path).is_absolute() or ".." in parts:
        raise VolumeError(f"invalid volume file path {path!r}")
    return str(PurePosixPath(*parts))


def sync(directory: Path, files: Files) -> bool:
    """Make ``directory`` hold exactly ``files``; True when anything changed."""
    directory.mkdir(parents=True, exist_ok=True)
    changed = False
    for relative, (content, mode) in files.items():
        target = directory / relative
        try:
            if target.read_bytes() == content:
                _chmod(target, mode)
                continue
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            pass
        write_atomic(target, content, mode)
        changed = True
    wanted = {directory / relative for relative in files}
    for existing in sorted(directory.rglob("*"), reverse=True):
        if existing.is_file() and existing not in wanted and not existing.name.startswith(".tmp-"):
            existing.unlink()
            changed = True
        elif (
            existing.is_dir()
            and not any(existing.iterdir())
            and not any(str(w).startswith(f"{existing}/") for w in wanted)
        ):
            existing.rmdir()
    return changed


def write_atomic(path: Path, content: bytes, mode: int = DEFAULT_MODE) -> None:
    """Replace ``path`` with ``content`` in one ``rename``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
        _chmod(Path(tmp), mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _chmod(path: Path, mode: int) -> None:
    # Loosely: the owner (this user) keeps read and write, so a later sync can replace the file.
    with contextlib.suppress(OSError):
        os.chmod(path, (mode & 0o777) | 0o600)
