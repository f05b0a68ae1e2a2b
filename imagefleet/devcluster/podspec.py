"""From a container's spec to a local process: environment, ``$(VAR)`` expansion, translations.

Pure functions (lookups of Secrets and ConfigMaps come in as callables), so the unit tests call
them directly. The two translations the process kubelet makes, because a local process shares
this machine's network and filesystem instead of having its own:

* **network**: an argv element or environment value that is exactly ``0.0.0.0`` (the wildcard a
  container binds in its own network namespace) becomes the pod's IP, so pods sharing loopback
  never collide on a port;
* **filesystem**: an argv element or environment value equal to a volumeMount's ``mountPath``, or
  starting with ``mountPath + "/"``, is rewritten to the host directory backing that volume
  (longest mountPath first). Paths elsewhere are left alone.

Each value is translated exactly once, after ``$(VAR)`` expansion: command and args expand
against the untranslated environment, so ``$(DATA)/x`` with ``DATA=/data`` becomes
``<host dir of /data>/x``.
"""

from __future__ import annotations

import base64
import decimal
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ZERO_ADDRESS = "0.0.0.0"
# Node allocatable, the default for resourceFieldRef limits a container does not set.
NODE_ALLOCATABLE = {"cpu": "32", "memory": "256Gi", "ephemeral-storage": "100Gi"}

# (namespace, name) -> the object's data decoded to text, or None when it does not exist.
DataLookup = Callable[[str, str], Mapping[str, str] | None]
Mounts = Sequence[tuple[str, str]]


class ConfigError(Exception):
    """The container cannot start as specified (the kubelet's CreateContainerConfigError)."""


# -- $(VAR) expansion ---------------------------------------------------------------------------


def expand(value: str, lookup: Callable[[str], str | None]) -> str:
    """Kubernetes' ``$(VAR)`` expansion (k8s.io/kubernetes third_party/forked/golang/expansion).

    ``$(NAME)`` becomes ``lookup(NAME)``, or stays as written when that is None; ``$$`` is an
    escaped ``$``; any other ``$`` is literal.
    """
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    while cursor < len(value):
        if value[cursor] == "$" and cursor + 1 < len(value):
            out.append(value[checkpoint:cursor])
            read, is_var, advance = _read_variable(value[cursor + 1 :])
            if is_var:
                found = lookup(read)
                out.append(found if found is not None else f"$({read})")
            else:
                out.append(read)
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    return "".join(out) + value[checkpoint:]


def _read_variable(rest: str) -> tuple[str, bool, int]:
    if rest[0] == "$":
        return "$", False, 1
    if rest[0] == "(":
        end = rest.find(")", 1)
        if end != -1:
            return rest[1:end], True, end + 1
        return "$(", False, 1
    return "$" + rest[0], False, 1


# -- environment --------------------------------------------------------------------------------


def decode_secret(data: Mapping[str, str] | None) -> dict[str, str]:
    """A Secret's base64 ``data`` as text."""
    return {k: base64.b64decode(v).decode(errors="replace") for k, v in (data or {}).items()}


def field_value(pod: Mapping[str, Any], path: str, pod_ip: str, host_ip: str) -> str:
    """The value of a downward-API ``fieldRef.fieldPath`` for ``pod``."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }
    if path in simple:
        return str(simple[path])
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = sorted((meta.get(path.split(".")[1]) or {}).items())
        return "\n".join(f'{k}="{_escape(v)}"' for k, v in items)
    raise ConfigError(f"unsupported fieldRef.fieldPath {path!r}")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_SUFFIXES: dict[str, decimal.Decimal] = {
    "": decimal.Decimal(1),
    "m": decimal.Decimal("0.001"),
    **{s: decimal.Decimal(10) ** (3 * (i + 1)) for i, s in enumerate("kMGTPE")},
    **{f"{s}i": decimal.Decimal(2) ** (10 * (i + 1)) for i, s in enumerate("KMGTPE")},
}


def parse_quantity(text: str) -> decimal.Decimal:
    """A Kubernetes resource quantity (``500m``, ``2Gi``, ``1e3``) as a number."""
    match = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)", str(text).strip())
    if not match or match.group(2) not in _SUFFIXES:
        raise ConfigError(f"bad quantity {text!r}")
    return decimal.Decimal(match.group(1)) * _SUFFIXES[match.group(2)]


def resource_value(container: Mapping[str, Any], resource: str, divisor: str | None) -> str:
    """The value of a ``resourceFieldRef`` (``limits.cpu``, ``requests.memory``, ...), rounded up."""
    kind, _, name = resource.partition(".")
    resources = container.get("resources") or {}
    limits = resources.get("limits") or {}
    requests = resources.get("requests") or {}
    if kind == "limits":
        raw = limits.get(name) or NODE_ALLOCATABLE.get(name, "0")
    elif kind == "requests":
        raw = requests.get(name) or limits.get(name) or "0"
    else:
        raise ConfigError(f"unsupported resourceFieldRef.resource {resource!r}")
    value = parse_quantity(raw) / parse_quantity(divisor or "1")
    return str(math.ceil(value))


def resolve_env(
    container: Mapping[str, Any],
    pod: Mapping[str, Any],
    *,
    pod_ip: str,
    host_ip: str,
    secret: DataLookup,
    config_map: DataLookup,
) -> dict[str, str]:
    """The container's environment as Kubernetes builds it: ``envFrom`` first, then ``env``.

    An ``env`` value expands ``$(VAR)`` against the variables defined before it. A missing Secret,
    ConfigMap or key fails with :class:`ConfigError` unless the reference is ``optional``.
    """
    namespace = (pod.get("metadata") or {}).get("namespace", "default")
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix") or ""
        for ref_key, lookup, what in (
            ("configMapRef", config_map, "configmap"),
            ("secretRef", secret, "secret"),
        ):
            ref = source.get(ref_key)
            if ref is None:
                continue
            data = lookup(namespace, ref.get("name", ""))
            if data is None:
                if ref.get("optional"):
                    continue
                raise ConfigError(f'{what} "{ref.get("name")}" not found')
            for key, value in data.items():
                env[prefix + key] = value
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item or "valueFrom" not in item:
            env[name] = expand(str(item.get("value") or ""), env.get)
            continue
        found = _value_from(item["valueFrom"], container, pod, namespace, pod_ip, host_ip, secret, config_map)
        if found is not None:
            env[name] = found
    return env


def _value_from(
    source: Mapping[str, Any],
    container: Mapping[str, Any],
    pod: Mapping[str, Any],
    namespace: str,
    pod_ip: str,
    host_ip: str,
    secret: DataLookup,
    config_map: DataLookup,
) -> str | None:
    if "fieldRef" in source:
        return field_value(pod, source["fieldRef"].get("fieldPath", ""), pod_ip, host_ip)
    if "resourceFieldRef" in source:
        ref = source["resourceFieldRef"]
        return resource_value(container, ref.get("resource", ""), ref.get("divisor"))
    for ref_key, lookup, what in (
        ("secretKeyRef", secret, "secret"),
        ("configMapKeyRef", config_map, "configmap"),
    ):
        if ref_key in source:
            ref = source[ref_key]
            data = lookup(namespace, ref.get("name", ""))
            key = ref.get("key", "")
            if data is not None and key in data:
                return data[key]
            if ref.get("optional"):
                return None
            if data is None:
                raise ConfigError(f'{what} "{ref.get("name")}" not found')
            raise ConfigError(f"couldn't find key {key} in {what} {namespace}/{ref.get('name')}")
    raise ConfigError(f"unsupported valueFrom {sorted(source)}")


# -- translations -------------------------------------------------------------------------------


def sort_mounts(mounts: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """(mountPath, host path) pairs, longest mountPath first; ``/`` itself is never rewritten."""
    cleaned = [(m.rstrip("/"), h) for m, h in mounts if m.rstrip("/")]
    return sorted(cleaned, key=lambda pair: len(pair[0]), reverse=True)


def translate(value: str, pod_ip: str, mounts: Mounts) -> str:
    """One argv element or environment value, as the local process must see it (module docstring).

    ``mounts`` must come from :func:`sort_mounts`.
    """
    if value == ZERO_ADDRESS:
        return pod_ip
    for mount_path, host in mounts:
        if value == mount_path:
            return host
        if value.startswith(mount_path + "/"):
            return host + value[len(mount_path) :]
    return value


def command_line(container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """``command + args`` with ``$(VAR)`` expanded against ``env`` (not yet translated)."""
    words = [*(container.get("command") or []), *(container.get("args") or [])]
    return [expand(str(w), env.get) for w in words]


def search_path(first: str, rest: str | None) -> str:
    """A PATH with ``first`` (the project's venv ``bin``) ahead of ``rest``."""
    return os.pathsep.join(p for p in (first, rest or os.defpath) if p)


def which(name: str, path: str) -> str | None:
    """``name`` resolved like execvp does; an absolute path missing on this machine falls back to
    its basename on ``path`` (image paths such as ``/usr/local/bin/python``)."""
    if "/" in name:
        if os.access(name, os.X_OK) and not os.path.isdir(name):
            return name
        if not os.path.isabs(name):
            return None
        name = os.path.basename(name)
    for directory in path.split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return None


@dataclass(frozen=True)
class Launch:
    """What to exec for one container: argv (argv[0] resolved), environment, working directory."""

    argv: list[str]
    env: dict[str, str]
    cwd: str


def launch(
    container: Mapping[str, Any],
    env: Mapping[str, str],
    *,
    pod_ip: str,
    mounts: Mounts,
    base_env: Mapping[str, str],
    venv_bin: str,
    default_cwd: str,
    idle_command: Sequence[str],
) -> Launch:
    """The process for ``container`` given its resolved (untranslated) ``env``.

    ``base_env`` (PATH, HOME, TMPDIR, KUBECONFIG, ...) fills in what the container does not set.
    A container without a ``command`` would run its image's entrypoint, which is unknown here:
    it runs ``idle_command`` (a process that waits for SIGTERM) instead.
    Raises :class:`ConfigError` when argv[0] cannot be found.
    """
    final_env = {k: translate(v, pod_ip, mounts) for k, v in env.items()}
    for key, value in base_env.items():
        final_env.setdefault(key, value)
    final_env["PATH"] = search_path(venv_bin, final_env.get("PATH"))
    if container.get("command"):
        argv = [translate(w, pod_ip, mounts) for w in command_line(container, env)]
    else:
        argv = list(idle_command)
    executable = which(argv[0], final_env["PATH"])
    if executable is None:
        raise ConfigError(f'exec: "{argv[0]}": executable file not found in $PATH')
    argv[0] = executable
    working = container.get("workingDir")
    cwd = translate(working, pod_ip, mounts) if working else default_cwd
    if not os.path.isdir(cwd):
        cwd = default_cwd
    return Launch(argv=argv, env=final_env, cwd=cwd)


def exec_argv(
    command: Sequence[str], raw_env: Mapping[str, str], path: str, pod_ip: str, mounts: Mounts
) -> list[str]:
    """An exec probe's or hook's command: expanded against the container's untranslated env,
    translated once, argv[0] resolved on ``path`` (the container process's PATH)."""
    words = [translate(expand(str(w), raw_env.get), pod_ip, mounts) for w in command]
    if words:
        words[0] = which(words[0], path) or words[0]
    return words
