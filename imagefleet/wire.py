"""Everything that crosses a process boundary: paths, headers, file ids, labels, the CRD's name.

The pod, the router and the operator are separate processes (often on separate machines) that
never import each other; what one writes and another reads is defined here, once. A change to
any constant below is a change of protocol between components of possibly different versions.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

# --- HTTP paths every pod serves (the router and the operator call them) ------------------------

HEALTH_PATH = "/healthz"
"""Alive: the process answers. Kubernetes' liveness probe."""
READY_PATH = "/readyz"
"""Serving: model loaded, not draining, not quarantined. Kubernetes' readiness probe."""
LOAD_PATH = "/v1/load"
"""The load report (:class:`imagefleet.loadreport.LoadReport` as JSON), polled by routers."""
METRICS_PATH = "/metrics"
"""Prometheus text exposition, scraped by Prometheus and by the operator."""
STATS_PATH = "/stats"
"""JSON counters in the shape Aquiles-Image users know."""
FILES_PATH = "/v1/images/files/"
"""Prefix of ``GET /v1/images/files/{file_id}``: images kept for ``response_format=url``."""

# --- headers -------------------------------------------------------------------------------------

FILE_PREFIX_HEADER = "X-Imagefleet-File-Prefix"
"""Router to pod: start the ids of files kept for ``response_format=url`` with this prefix (see
:func:`compose_file_id`), so that the router can tell from an id which pod holds the file."""

TIER_HEADER = "X-Imagefleet-Tier"
"""Pod to client (relayed by routers): the quality tier that produced the images of a response."""
PUBLIC_BASE_HEADER = "X-Imagefleet-Public-Base"
"""Router to pod: ``scheme://host[:port][/prefix]`` that the URLs of ``response_format=url`` start
with. The router always sets it (and never passes a client's), so a client cannot choose where
returned URLs point; the pod falls back to its own address without it."""
_HOST = r"(?:[A-Za-z0-9][A-Za-z0-9.\-]{0,252}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?"
_PREFIX_SEGMENT = r"/[A-Za-z0-9_~\-][A-Za-z0-9._~\-]{0,127}"
_PUBLIC_BASE = re.compile(rf"^https?://{_HOST}(?:{_PREFIX_SEGMENT}){{0,16}}$")
_PUBLIC_HOST = re.compile(rf"^{_HOST}$")
_PUBLIC_PREFIX = re.compile(rf"^(?:{_PREFIX_SEGMENT}){{0,16}}$")


def valid_public_base(value: str) -> bool:
    """Whether a PUBLIC_BASE_HEADER value is well formed: no user info, query or fragment, and no
    ``.``/``..`` segment, empty segment or percent-escape in the prefix."""
    return bool(_PUBLIC_BASE.match(value))


def valid_public_host(host: str) -> bool:
    """``host[:port]`` as it may appear in a public base."""
    return bool(_PUBLIC_HOST.match(host))


def valid_public_prefix(prefix: str) -> bool:
    """A path prefix (``/a/b``, or "") as it may appear in a public base."""
    return bool(_PUBLIC_PREFIX.match(prefix))


# --- file ids ------------------------------------------------------------------------------------
#
# A file id is ``[<backend key>~]<token>.<format>``: the optional key names the pod that holds the
# file (a router asked for it with FILE_PREFIX_HEADER), the token is random, the format is the
# image's. Routers find the pod from the key among the pods they know; an address is never taken
# from an id, so a forged id can reach nothing but a known pod.

FILE_KEY_SEPARATOR = "~"
FILE_FORMATS = ("png", "jpeg", "webp")
_KEY = r"[A-Za-z0-9_-]{1,64}"
_TOKEN = r"[A-Za-z0-9_-]{1,128}"
_FORMAT = "|".join(FILE_FORMATS)
_FILE_ID = re.compile(rf"^(?:({_KEY}){FILE_KEY_SEPARATOR})?({_TOKEN})\.({_FORMAT})$")
_PREFIX = re.compile(rf"^(?:{_KEY}{FILE_KEY_SEPARATOR})?$")


@dataclass(frozen=True)
class FileId:
    """A parsed file id."""

    key: str | None
    """The backend key of the pod holding the file, when a router asked for one."""
    token: str
    format: str

    def __str__(self) -> str:
        head = f"{self.key}{FILE_KEY_SEPARATOR}" if self.key else ""
        return f"{head}{self.token}.{self.format}"


def file_prefix(key: str) -> str:
    """The FILE_PREFIX_HEADER value a router sends to the pod it knows as ``key``."""
    if not re.fullmatch(_KEY, key):
        raise ValueError(f"not a backend key: {key!r}")
    return key + FILE_KEY_SEPARATOR


def valid_file_prefix(prefix: str) -> bool:
    """Whether a FILE_PREFIX_HEADER value is well formed ("" is: no prefix)."""
    return bool(_PREFIX.match(prefix))


def compose_file_id(prefix: str, image_format: str, token: str | None = None) -> str:
    """A new file id: ``prefix`` (from FILE_PREFIX_HEADER, may be "") + a random token + format."""
    if not valid_file_prefix(prefix):
        raise ValueError(f"not a file-id prefix: {prefix[:80]!r}")
    if image_format not in FILE_FORMATS:
        raise ValueError(f"not an image format: {image_format!r}")
    token = token or secrets.token_urlsafe(16)
    if not re.fullmatch(_TOKEN, token):
        raise ValueError("a token is 1-128 characters of A-Z a-z 0-9 _ -")
    return f"{prefix}{token}.{image_format}"


def parse_file_id(file_id: str) -> FileId | None:
    """The parts of a file id, or None when it is not one any pod issues."""
    match = _FILE_ID.match(file_id)
    if match is None:
        return None
    key, token, image_format = match.groups()
    return FileId(key=key, token=token, format=image_format)


# --- the custom resource ---------------------------------------------------------------------------

GROUP = "imagefleet.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ImageGenerator"
PLURAL = "imagegenerators"
SINGULAR = "imagegenerator"
SHORT_NAME = "imggen"
CRD_NAME = f"{PLURAL}.{GROUP}"

# --- Kubernetes labels and annotations ---------------------------------------------------------------
#
# Recommended app.kubernetes.io labels plus the project's own under imagefleet.dev/. Routers find
# their pods by LABEL_GENERATOR + LABEL_COMPONENT; the operator finds everything it owns by
# LABEL_MANAGED_BY + LABEL_GENERATOR.

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_VERSION = "app.kubernetes.io/version"

APP_NAME = "imagefleet"
MANAGED_BY = "imagefleet-operator"
COMPONENT_POD = "inference-pod"
COMPONENT_ROUTER = "router"
COMPONENT_OPERATOR = "operator"

LABEL_GENERATOR = f"{GROUP}/generator"
"""Name of the ImageGenerator an object belongs to."""
LABEL_SLOT = f"{GROUP}/slot"
"""An inference pod's replica slot (0..replicas-1): its stable place in the set."""
LABEL_TEMPLATE_HASH = f"{GROUP}/template-hash"
"""Hash of everything that shapes an inference pod; a pod with another hash is out of date."""

ANNOTATION_REPLACED_REASON = f"{GROUP}/replaced-because"
"""Set by the operator on a pod it deletes to replace it, saying why."""
ANNOTATION_CONFIG_HASH = f"{GROUP}/config-hash"
"""Hash of the settings ConfigMap a router pod was started with (restarts it when they change)."""


def generator_labels(generator: str, component: str) -> dict[str, str]:
    """The labels of every object of ``generator``'s ``component``."""
    return {
        LABEL_NAME: APP_NAME,
        LABEL_INSTANCE: generator,
        LABEL_COMPONENT: component,
        LABEL_PART_OF: APP_NAME,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_GENERATOR: generator,
    }


def pod_selector(generator: str) -> dict[str, str]:
    """matchLabels of ``generator``'s inference pods (the router's discovery, the scale subresource)."""
    return {LABEL_GENERATOR: generator, LABEL_COMPONENT: COMPONENT_POD}


def selector_string(match_labels: dict[str, str]) -> str:
    """matchLabels as a label-selector string (``a=b,c=d``), sorted for a stable status."""
    return ",".join(f"{k}={v}" for k, v in sorted(match_labels.items()))
