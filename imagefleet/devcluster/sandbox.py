"""A pod's sandbox on a process node: its directories, volumes and service-account credentials.

The directory ``<state-dir>/pods/<namespace>_<pod>/<uid>/`` holds ``home``, ``tmp`` and ``work``
(the default working directory), ``volumes/<name>`` and ``serviceaccount/`` (``token``,
``ca.crt``, ``namespace`` and a ``kubeconfig`` that uses them, never the admin's). See
:mod:`.volumes` for what each volume kind becomes.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from imagefleet.devcluster import podspec, volumes
from imagefleet.devcluster.kubeapi import Kube, path
from imagefleet.devcluster.podstatus import now, parse_time

log = logging.getLogger("imagefleet.devcluster.kubelet")

_TIMEOUT = (3.0, 10.0)


class PodSandbox:
    """Directories, volumes and tokens of one pod (by UID)."""

    def __init__(
        self,
        kube: Kube,
        state_dir: Path,
        run_dir: Path,
        pod: dict[str, Any],
        *,
        host_ip: str,
        token_expiration_s: int,
    ) -> None:
        meta = pod["metadata"]
        self.kube, self.state_dir, self.run_dir, self.pod = kube, state_dir, run_dir, pod
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.uid: str = meta["uid"]
        self.key = f"{self.namespace}/{self.name}"
        self.host_ip = host_ip
        self.pod_ip = ""
        self.token_expiration_s = token_expiration_s
        self.volumes: dict[str, volumes.Volume] = {}
        self.tokens: dict[tuple[str | None, int], tuple[str, float]] = {}
        self.kubeconfig: Path | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def prepare(self, pod: dict[str, Any], pod_ip: str) -> None:
        """Create everything; raises (missing Secret, apiserver away, ...) and may be called again."""
        self.pod, self.pod_ip = pod, pod_ip
        for sub in ("home", "tmp", "work"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        self.volumes = volumes.plan(pod, self.run_dir, self.state_dir)
        for volume in self.volumes.values():
            if volume.synced:
                volumes.sync(volume.path, self._contents(volume))
            else:
                volumes.create(volume)
        if self._automount():
            self._write_service_account()

    def resync(self, pod: dict[str, Any]) -> None:
        """Re-read Secrets, ConfigMaps, downward API and tokens into the volumes (like the kubelet's
        periodic sync); a failed read keeps the files as they are."""
        self.pod = pod
        for volume in self.volumes.values():
            if not volume.synced:
                continue
            try:
                if volumes.sync(volume.path, self._contents(volume)):
                    log.info("pod %s: volume %s updated", self.key, volume.name)
            except Exception as err:
                log.warning("pod %s: re-syncing volume %s failed: %s", self.key, volume.name, err)
        if self.kubeconfig is not None:
            try:
                self._write_service_account()
            except Exception as err:
                log.warning("pod %s: refreshing the service-account token failed: %s", self.key, err)

    def cleanup(self) -> None:
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def mounts(self, container: Mapping[str, Any], env: Mapping[str, str]) -> list[tuple[str, str]]:
        """(mountPath, host path) of the container's volumeMounts, longest mountPath first."""
        pairs = []
        for mount in container.get("volumeMounts") or []:
            volume = self.volumes.get(mount.get("name", ""))
            if volume is None:
                continue
            host = volume.path
            sub = mount.get("subPath") or (
                podspec.expand(mount["subPathExpr"], env.get) if mount.get("subPathExpr") else ""
            )
            if sub:
                host = host / sub.lstrip("/")
                if not volume.synced and not host.exists():
                    host.mkdir(parents=True, exist_ok=True)
            pairs.append((str(mount.get("mountPath", "")), str(host)))
        return podspec.sort_mounts(pairs)

    # -- lookups ---------------------------------------------------------------------------------

    def _object(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.kube.get(path("/api/v1/namespaces", namespace, kind, name), timeout=_TIMEOUT)

    def secret_text(self, namespace: str, name: str) -> dict[str, str] | None:
        obj = self._object("secrets", namespace, name)
        return None if obj is None else podspec.decode_secret(obj.get("data"))

    def config_map_text(self, namespace: str, name: str) -> dict[str, str] | None:
        obj = self._object("configmaps", namespace, name)
        return None if obj is None else {str(k): str(v) for k, v in (obj.get("data") or {}).items()}

    def _contents(self, volume: volumes.Volume) -> volumes.Files:
        return volumes.contents(
            volume,
            self.pod,
            secret=functools.partial(self._object, "secrets"),
            config_map=functools.partial(self._object, "configmaps"),
            token=self.token,
            pod_ip=self.pod_ip,
            host_ip=self.host_ip,
        )

    # -- service account -------------------------------------------------------------------------

    @property
    def service_account(self) -> str:
        return str((self.pod.get("spec") or {}).get("serviceAccountName") or "default")

    def _automount(self) -> bool:
        explicit = (self.pod.get("spec") or {}).get("automountServiceAccountToken")
        if explicit is not None:
            return bool(explicit)
        account = self._object("serviceaccounts", self.namespace, self.service_account)
        return not (account is not None and account.get("automountServiceAccountToken") is False)

    def token(self, audience: str | None, expiration: int) -> str:
        """A token for the pod's ServiceAccount bound to this pod; requested again at 80% of its life."""
        key = (audience, expiration)
        cached = self.tokens.get(key)
        if cached is not None and time.monotonic() < cached[1]:
            return cached[0]
        spec: dict[str, Any] = {
            "expirationSeconds": expiration,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid},
        }
        if audience:
            spec["audiences"] = [audience]
        answer = self.kube.request(
            "POST",
            path("/api/v1/namespaces", self.namespace, "serviceaccounts", self.service_account, "token"),
            body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
            timeout=_TIMEOUT,
        )
        token = str(answer["status"]["token"])
        expires = parse_time(answer["status"].get("expirationTimestamp"))
        lifetime = (expires - now()).total_seconds() if expires else float(expiration)
        self.tokens[key] = (token, time.monotonic() + 0.8 * max(lifetime, 1.0))
        return token

    def _write_service_account(self) -> None:
        directory = self.run_dir / "serviceaccount"
        token = self.token(None, self.token_expiration_s)
        ca = Path(self.kube.ca_file).read_bytes() if self.kube.ca_file else b""
        volumes.sync(
            directory,
            {
                "token": (token.encode(), 0o600),
                "ca.crt": (ca, 0o644),
                "namespace": (self.namespace.encode(), 0o644),
                "kubeconfig": (json.dumps(self._kubeconfig(directory, token), indent=2).encode(), 0o600),
            },
        )
        self.kubeconfig = directory / "kubeconfig"

    def _kubeconfig(self, directory: Path, token: str) -> dict[str, Any]:
        user = f"system:serviceaccount:{self.namespace}:{self.service_account}"
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "imagefleet-dev",
                    "cluster": {
                        "server": self.kube.server,
                        "certificate-authority": str(directory / "ca.crt"),
                    },
                }
            ],
            # The token inline: kopf's own kubeconfig reader takes `token`, not `tokenFile`.
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [
                {
                    "name": "pod",
                    "context": {"cluster": "imagefleet-dev", "user": user, "namespace": self.namespace},
                }
            ],
            "current-context": "pod",
        }
