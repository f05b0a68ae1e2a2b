"""One typed settings object per process, parsed once from flags and the environment.

Every setting is a dataclass field declared with :func:`setting`: its type, its one default, its
help text and the environment variable that may set it (``IMAGEFLEET_<NAME>``). The CLI builds its
flags from these declarations (flag > environment > default) and the result is frozen, so every
other layer receives a finished object and nothing re-declares a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from imagefleet import wire

ENV_PREFIX = "IMAGEFLEET_"

T = TypeVar("T")


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the flag and variable."""


def setting(
    default: Any,
    help: str,
    *,
    choices: Iterable[str] | None = None,
    secret: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
) -> Any:
    """Declare a setting: a dataclass field carrying its help text, allowed choices and bounds.

    ``minimum`` and ``maximum`` (inclusive) are checked when the settings object is built, and
    they are the bounds the ImageGenerator CRD must declare for the same field (a test compares
    them), so there is one place that says what a setting may be.
    """
    meta = {
        "help": help,
        "choices": tuple(choices) if choices else None,
        "secret": secret,
        "minimum": minimum,
        "maximum": maximum,
    }
    if isinstance(default, (list, dict, set)):
        raise TypeError("settings use immutable defaults (tuples)")
    return field(default=default, metadata=meta)


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


# --- the settings objects --------------------------------------------------------------------


@dataclass(frozen=True)
class HttpServerSettings:
    """How the pod's and the router's HTTP servers treat connections (both inherit these).

    A connection gets ``header_timeout_s`` to deliver a request's headers (from its first byte,
    or from the connection's opening), ``body_timeout_s`` between two pieces of a body being
    read, and ``keepalive_timeout_s`` idle between requests. At most ``max_connections`` are
    served at once (a connection beyond the cap is answered 503 and closed), a declared
    Content-Length above the body limit is refused with 413 before any of the body is read,
    and request bodies held in memory across all requests together stay within
    ``max_buffered_mb`` (a request that would exceed it gets 503 with Retry-After).
    """

    header_timeout_s: float = setting(
        10.0, "seconds a connection may take to send a request's headers", minimum=0.1, maximum=3600
    )
    body_timeout_s: float = setting(
        30.0,
        "seconds a request body may go without sending a byte while it is read",
        minimum=0.1,
        maximum=3600,
    )
    keepalive_timeout_s: float = setting(
        75.0, "seconds an idle keep-alive connection stays open", minimum=0.1, maximum=3600
    )
    max_connections: int = setting(
        4096, "connections served at once; more are answered 503 and closed", minimum=1, maximum=1000000
    )
    max_buffered_mb: float = setting(
        256.0, "request bodies held in memory across all requests together, in MiB", minimum=0.001
    )

    @property
    def max_buffered_bytes(self) -> int:
        return int(self.max_buffered_mb * 1024 * 1024)


@dataclass(frozen=True)
class PodSettings(HttpServerSettings):
    """An inference pod: one process, one GPU (or the CPU), one model.

    Stopping takes three steps, each with its own time budget (seconds):

    1. ``drain_timeout_s``: after SIGTERM the pod refuses new work (503, so routers send it
       elsewhere) and keeps working through what it accepted, for at most this long;
    2. ``shutdown_timeout_s``: then in-flight HTTP handlers get this long to finish writing their
       responses (below the drain time: writing a response takes far less than making it);
    3. ``stop_timeout_s``: whoever runs the pod waits this long after SIGTERM before SIGKILL:
       local mode does so itself and the operator sets it as ``terminationGracePeriodSeconds``.
       It must exceed drain + shutdown so that a draining pod is never cut short.

    The order ``shutdown < drain`` and ``drain + shutdown < stop`` is checked when the settings
    are built, so a pod never starts with budgets that would kill it mid-drain.
    """

    model: str = setting("tiny", "Hugging Face id, local path, `tiny`, or `synthetic:<arch>`")
    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8001, "port to listen on", minimum=1, maximum=65535)
    device: str = setting("auto", "torch device: auto (cuda when present, else cpu), cpu, cuda, cuda:N")
    dtype: str = setting("auto", "weights dtype", choices=("auto", "float32", "float16", "bfloat16"))
    revision: str | None = setting(None, "model revision (branch, tag or commit) for Hugging Face ids")
    variant: str | None = setting(None, "weights variant for Hugging Face ids, e.g. fp16")
    max_batch_size: int = setting(4, "most samples in one pipeline call", minimum=1, maximum=64)
    max_wait_ms: int = setting(
        500,
        "longest a sample may wait for its batch to fill; only spent when a larger batch pays",
        minimum=0,
        maximum=60000,
    )
    batch_policy: str = setting(
        "auto",
        "auto: batch where the measured cost curve says it pays; fill: always batch as many as allowed; "
        "fixed: also wait up to max_wait_ms for a full batch (classic dynamic batching)",
        choices=("auto", "fill", "fixed"),
    )
    batch_mode: str = setting(
        "request",
        "request: a batch runs all its steps together; step: text-to-image samples of a flow-matching model "
        "(SD3 family) join and leave the running batch between denoising steps",
        choices=("request", "step"),
    )
    max_queued_images: int = setting(
        64, "queued samples beyond which new requests get 429", minimum=1, maximum=100000
    )
    max_queued_gpu_seconds: float = setting(
        1200.0,
        "estimated GPU-seconds of queued work beyond which new requests get 429 (at least "
        "max_request_gpu_seconds)",
        minimum=1,
    )
    max_request_gpu_seconds: float = setting(
        600.0,
        "estimated GPU-seconds beyond which a single request gets 400 (default: the router's "
        "request timeout, which such a request could not finish within)",
        minimum=1,
    )
    max_images_per_request: int = setting(10, "largest `n` a request may ask for", minimum=1, maximum=128)
    max_pixels: int = setting(
        2048 * 2048, "largest width*height a request may ask for", minimum=64 * 64, maximum=8192 * 8192
    )
    max_side: int = setting(4096, "largest width or height a request may ask for", minimum=64, maximum=16384)
    max_steps: int = setting(
        150, "largest num_inference_steps a request may ask for", minimum=1, maximum=1000
    )
    max_prompt_chars: int = setting(
        4000, "longest prompt or negative prompt, in characters", minimum=1, maximum=100000
    )
    max_body_mb: float = setting(32.0, "largest request body (uploads included), in MiB", minimum=0.001)
    default_steps: int | None = setting(
        None, "steps when a request names none (model default if unset)", minimum=1, maximum=1000
    )
    default_guidance: float | None = setting(
        None, "guidance scale when a request names none (model default if unset)", minimum=0, maximum=100
    )
    default_size: str | None = setting(None, "size (WxH) when a request names none (model default if unset)")
    file_ttl_s: float = setting(3600.0, "how long images of response_format=url stay downloadable", minimum=0)
    file_store_mb: float = setting(
        512.0, "memory for images kept for response_format=url, in MiB", minimum=0.001
    )
    encode_workers: int = setting(
        4, "threads that encode images (PNG/JPEG/WebP) and base64", minimum=1, maximum=256
    )
    quarantine_after: int = setting(
        3, "consecutive failed batches after which the pod quarantines itself", minimum=1
    )
    stall_after_s: float = setting(
        600.0,
        "seconds a running batch may go without completing a denoising step before the pod counts its "
        "GPU as hung: /healthz fails (the kubelet restarts the pod), /readyz and new requests get 503",
        minimum=1,
    )
    warmup: bool = setting(True, "run and time small batches at start-up before reporting ready")
    warmup_sizes: str | None = setting(
        None,
        "comma-separated WxH sizes warmed up (and, when compiled, compiled) at every batch size before "
        "the pod reports ready; default: the model's default size",
    )
    compile: str = setting(
        "auto",
        "torch.compile each repeated transformer block: auto (blocks, on a GPU) | blocks | blocks-graphs "
        "(the same, replayed as CUDA graphs per shape) | off",
        choices=("auto", "blocks", "blocks-graphs", "off"),
    )
    compile_cache_dir: str | None = setting(
        None, "directory keeping compiled code across restarts (Kubernetes: on the model-cache volume)"
    )
    attention: str = setting(
        "auto",
        "attention kernel in the denoiser: auto (FlashAttention-4 where flash-attn-4 is installed, on "
        "Hopper or Blackwell) | fa4 (required: without it the load fails, with the reason) | sdpa (PyTorch's dispatch)",
        choices=("auto", "fa4", "sdpa"),
    )
    fuse_projections: bool = setting(True, "one matrix product for query, key and value (SD3 family)")
    fuse_gelu: bool = setting(
        True, "the feed-forward's tanh GELU in its matrix product's epilogue: one cuBLASLt call (SD3, Flux)"
    )
    encoder_graphs: bool = setting(
        True,
        "replay the text encoders as CUDA graphs, one per batch size (GPU only; the same kernels, so the "
        "same embeddings: each graph is checked against eager once)",
    )
    tune_decoder: bool = setting(
        False,
        "GPU only: the VAE decoder in channels-last, cuDNN timing its convolution algorithms once per shape "
        "at warm-up",
    )
    tiers: str = setting(
        "lossless",
        "quality tiers served: lossless, or lossless,fast (fast: a first-block step cache, opt-in per request)",
        choices=("lossless", "lossless,fast"),
    )
    fast_policy: str = setting(
        "schedule",
        "fast tier: schedule (every --fast-interval-th step runs all blocks after 3 full ones) | threshold "
        "(diffusers' first-block cache rule, --fast-threshold)",
        choices=("schedule", "threshold"),
    )
    fast_interval: int = setting(3, "fast tier, schedule: one full step in this many", minimum=1, maximum=10)
    fast_threshold: float = setting(
        0.1,
        "fast tier, threshold: the first block's relative change below which a step reuses the cached rest",
        minimum=0.001,
        maximum=10,
    )
    drain_timeout_s: float = setting(
        25.0,
        "seconds a stopping pod keeps working through accepted requests (above shutdown_timeout_s)",
        minimum=0,
    )
    shutdown_timeout_s: float = setting(
        5.0, "seconds in-flight responses get to finish after the drain (below drain_timeout_s)", minimum=0
    )
    stop_timeout_s: float = setting(
        40.0,
        "seconds from SIGTERM to SIGKILL given by whoever runs the pod (local mode; Kubernetes' "
        "terminationGracePeriodSeconds); above drain_timeout_s + shutdown_timeout_s",
        minimum=1,
    )
    fault_injection: bool = setting(False, "enable the /debug/faults test hook (never in production)")
    instance_id: str = setting(
        "",
        "identity reported in the load report; a router that expects another one ignores this pod "
        "(local mode sets one per pod)",
    )
    log_level: str = setting("info", "log level", choices=("debug", "info", "warning", "error"))

    def warmup_size_list(self) -> list[tuple[int, int]]:
        """``warmup_sizes`` as (width, height) pairs; [] means the model's default size."""
        text = self.warmup_sizes or ""
        return [parse_size(part, "--warmup-sizes") for part in text.split(",") if part.strip()]

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.max_queued_images < self.max_images_per_request:
            raise SettingsError(
                f"--max-queued-images ({self.max_queued_images}) must be at least "
                f"--max-images-per-request ({self.max_images_per_request})"
            )
        if self.max_request_gpu_seconds > self.max_queued_gpu_seconds:
            raise SettingsError(
                f"--max-request-gpu-seconds ({self.max_request_gpu_seconds}) must not exceed "
                f"--max-queued-gpu-seconds ({self.max_queued_gpu_seconds}) (one request must fit in a queue)"
            )
        if self.max_batch_size > self.max_queued_images:
            raise SettingsError(
                f"--max-batch-size ({self.max_batch_size}) must not exceed "
                f"--max-queued-images ({self.max_queued_images})"
            )
        if self.default_steps is not None and self.default_steps > self.max_steps:
            raise SettingsError(
                f"--default-steps ({self.default_steps}) must not exceed --max-steps ({self.max_steps})"
            )
        for size in self.warmup_size_list():
            if size[0] * size[1] > self.max_pixels or max(size) > self.max_side:
                raise SettingsError(f"--warmup-sizes: {size[0]}x{size[1]} exceeds --max-pixels or --max-side")
        if self.default_size is not None:
            width, height = parse_size(self.default_size, "--default-size")
            if width * height > self.max_pixels or max(width, height) > self.max_side:
                raise SettingsError(
                    f"--default-size {self.default_size} exceeds --max-pixels ({self.max_pixels}) "
                    f"or --max-side ({self.max_side})"
                )
        _ordered(self, "shutdown_timeout_s", "drain_timeout_s")
        _check_http(self, self.max_body_mb)
        if self.drain_timeout_s + self.shutdown_timeout_s >= self.stop_timeout_s:
            raise SettingsError(
                f"--stop-timeout-s ({self.stop_timeout_s}) must exceed --drain-timeout-s "
                f"({self.drain_timeout_s}) + --shutdown-timeout-s ({self.shutdown_timeout_s}): "
                "otherwise a draining pod is killed before it finishes"
            )

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


@dataclass(frozen=True)
class RouterSettings(HttpServerSettings):
    """The router: the one address clients use, in front of every pod of one model.

    On SIGTERM the router stops accepting connections and gives requests in flight
    ``shutdown_timeout_s`` to finish; whoever runs it waits ``stop_timeout_s`` (larger, checked
    here) before SIGKILL.
    """

    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8000, "port to listen on")
    discovery: str = setting("static", "where backends come from", choices=("static", "kubernetes"))
    backends: tuple[str, ...] = setting(
        (),
        "static backends, comma separated base URLs; `URL#ID` adopts the backend only while its load "
        "report names instance ID",
    )
    namespace: str = setting("default", "Kubernetes namespace of the pods (discovery=kubernetes)")
    selector: str = setting("", "label selector of the pods (discovery=kubernetes)")
    backend_port: int = setting(8001, "port the pods listen on (discovery=kubernetes)")
    poll_interval_ms: int = setting(100, "how often each backend's load report is fetched")
    pick: str = setting(
        "least-wait",
        "backend choice: lowest expected wait with jitter, or power of two choices",
        choices=("least-wait", "p2c"),
    )
    request_timeout_s: float = setting(600.0, "a request still unanswered after this gets 504")
    max_attempts: int = setting(3, "tries per request across backends (1 = no retry)")
    eject_after: int = setting(2, "consecutive failures after which a backend is taken out")
    backoff_s: float = setting(1.0, "first time-out of an ejected backend; doubles per failed probe")
    backoff_max_s: float = setting(30.0, "longest time-out of an ejected backend")
    api_keys: tuple[str, ...] = setting((), "accepted Bearer API keys, comma separated", secret=True)
    api_keys_file: str | None = setting(None, "file (e.g. a mounted Secret) with one API key per line")
    protect_metrics: bool = setting(True, "when API keys are set, /metrics and /stats need one too")
    trusted_proxies: tuple[str, ...] = setting(
        (),
        "addresses or CIDRs of proxies whose X-Forwarded-Proto/Host/Prefix are believed, comma separated",
    )
    public_base_url: str | None = setting(
        None, "scheme://host[/prefix] that image URLs start with (default: from the request)"
    )
    url_signing_key: str | None = setting(
        None, "key that signs image URLs (all router replicas need the same one)", secret=True
    )
    url_signing_key_file: str | None = setting(
        None, "file (e.g. a mounted Secret) holding the key that signs image URLs"
    )
    signed_url_ttl_s: float = setting(
        3600.0, "how long a signed image URL stays valid", minimum=1, maximum=7 * 24 * 3600
    )
    max_body_mb: float = setting(32.0, "largest request body (uploads included), in MiB")
    web: bool = setting(
        True,
        "serve the web playground (/) and fleet page (/fleet); they call the public API, so API "
        "keys still apply",
    )
    shutdown_timeout_s: float = setting(
        25.0,
        "seconds requests in flight get to finish when the router stops (below stop_timeout_s)",
        minimum=0,
    )
    stop_timeout_s: float = setting(
        30.0,
        "seconds from SIGTERM to SIGKILL given by whoever runs the router (Kubernetes' "
        "terminationGracePeriodSeconds); above shutdown_timeout_s",
        minimum=1,
    )
    log_level: str = setting("info", "log level", choices=("debug", "info", "warning", "error"))

    def __post_init__(self) -> None:
        check_bounds(self)
        _positive(self, "port", "backend_port", "poll_interval_ms", "request_timeout_s", "max_attempts")
        _positive(self, "eject_after", "backoff_s", "backoff_max_s", "max_body_mb")
        _ordered(self, "shutdown_timeout_s", "stop_timeout_s")
        _check_http(self, self.max_body_mb)
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise SettingsError(f"--trusted-proxies: {proxy!r} is not an address or CIDR") from None
        if self.public_base_url is not None and not wire.valid_public_base(self.public_base_url.rstrip("/")):
            raise SettingsError(
                f"--public-base-url {self.public_base_url!r}: expected http(s)://host[:port][/prefix] "
                "(no user, query, fragment, '.' or '..' segments)"
            )
        if self.url_signing_key is not None and len(self.url_signing_key) < 16:
            raise SettingsError(
                "--url-signing-key / IMAGEFLEET_URL_SIGNING_KEY must be at least 16 characters"
            )

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


@dataclass(frozen=True)
class ServeSettings:
    """Local mode: a router plus one pod process per GPU, on one machine."""

    gpus: str = setting("all", "GPUs to use: all, none, or a comma separated list such as 0,1")
    pod_base_port: int = setting(8101, "first port of the pod processes (one per GPU)")
    restart_backoff_s: float = setting(1.0, "pause before a crashed pod process is restarted")
    health_interval_s: float = setting(
        1.0, "how often each pod's load report is read; a quarantined pod is replaced", minimum=0.05
    )
    cpu_pods: int = setting(
        1, "pod processes to run when no GPU is used (CPU demos, tests, benchmark smoke runs)"
    )

    def __post_init__(self) -> None:
        check_bounds(self)
        _positive(self, "pod_base_port", "cpu_pods")


@dataclass(frozen=True)
class OperatorSettings:
    """The operator: reconciles ImageGenerators into inference pods, a router and their status.

    Its pods' stop budget comes from :class:`PodSettings` (``stop_timeout_s`` becomes
    ``terminationGracePeriodSeconds``, after a ``prestop_delay_s`` preStop pause that lets routers
    drop a stopping pod before it is signalled); ``stop_timeout_s`` of the operator itself is
    what its Deployment should give it.
    """

    namespaces: tuple[str, ...] = setting((), "namespaces to watch, comma separated (empty: all namespaces)")
    default_image: str = setting(
        "ghcr.io/imagefleet/imagefleet:0.1.0",
        "container image of the inference pods (CUDA, torch) when a resource names none",
    )
    router_image: str = setting(
        "ghcr.io/imagefleet/imagefleet-control:0.1.0",
        "container image of the routers (the small control image, no torch)",
    )
    image_pull_policy: str | None = setting(
        None, "pull policy when a resource names none", choices=("Always", "IfNotPresent", "Never")
    )
    status_interval_s: float = setting(
        10.0, "seconds between status refreshes (scrape every ready pod's /metrics)", minimum=1, maximum=3600
    )
    scrape_timeout_s: float = setting(
        2.0, "seconds one pod's /metrics may take (below status_interval_s)", minimum=0.1, maximum=60
    )
    scrape_concurrency: int = setting(
        256, "pods scraped at once across all resources", minimum=1, maximum=10000
    )
    resync_s: float = setting(
        300.0, "seconds after which every owned object is applied again (drift repair)", minimum=10
    )
    max_unavailable_replacements: int = setting(
        1, "faulty pods of one resource replaced at a time", minimum=1, maximum=1000
    )
    crash_loop_restarts: int = setting(
        3, "container restarts after which a pod is reported crash-looping", minimum=1, maximum=1000
    )
    pod_port: int = setting(8001, "port the inference pods listen on", minimum=1, maximum=65535)
    router_port: int = setting(8000, "port the router pods listen on", minimum=1, maximum=65535)
    prestop_delay_s: int = setting(
        3,
        "seconds a stopping pod waits in preStop before SIGTERM, so routers drop it first",
        minimum=0,
        maximum=60,
    )
    leader_election: bool = setting(
        False, "run only while holding a Lease, so several replicas are safe (on in the Helm chart)"
    )
    lease_name: str = setting("imagefleet-operator", "name of the leader-election Lease")
    lease_namespace: str | None = setting(
        None, "namespace of the Lease (default: the operator's own, from POD_NAMESPACE)"
    )
    lease_duration_s: int = setting(
        15, "seconds a leader's Lease lasts without renewal", minimum=5, maximum=600
    )
    pod_fault_injection: bool = setting(
        False, "start inference pods with the /debug/faults test hook (tests only, never in production)"
    )
    network_policy: bool = setting(
        True,
        "give each resource a NetworkPolicy: only its routers, this operator's pods and "
        "--metrics-namespaces may reach its inference pods (which trust their network)",
    )
    operator_namespace: str | None = setting(
        None, "namespace of the operator's own pods, let through the NetworkPolicy (default: POD_NAMESPACE)"
    )
    metrics_namespaces: tuple[str, ...] = setting(
        (), "namespaces whose pods may scrape the inference pods, e.g. Prometheus', comma separated"
    )
    router_web: bool = setting(
        True, "routers serve the web playground (/) and fleet page (/fleet) (the routers' --web)"
    )
    health_port: int = setting(
        8080, "port of the operator's /healthz (liveness) endpoint; 0 turns it off", minimum=0, maximum=65535
    )
    health_host: str = setting("0.0.0.0", "address of the /healthz endpoint")
    stop_timeout_s: float = setting(
        30.0, "seconds from SIGTERM to SIGKILL its Deployment gives the operator", minimum=1
    )
    log_level: str = setting("info", "log level", choices=("debug", "info", "warning", "error"))

    def __post_init__(self) -> None:
        check_bounds(self)
        _ordered(self, "scrape_timeout_s", "status_interval_s")


def check_bounds(obj: object) -> None:
    """Check every setting of ``obj`` against its declared ``minimum`` and ``maximum``."""
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        low, high = f.metadata.get("minimum"), f.metadata.get("maximum")
        if (low is not None and value < low) or (high is not None and value > high):
            span = (
                f"between {low} and {high}"
                if low is not None and high is not None
                else (f">= {low}" if low is not None else f"<= {high}")
            )
            raise SettingsError(f"{flag_name(f.name)} / {env_name(f.name)} must be {span}, got {value!r}")


def parse_size(text: str, source: str) -> tuple[int, int]:
    """``WxH`` (ASCII digits) as (width, height)."""
    width, sep, height = text.strip().lower().partition("x")
    if not sep or not (width.isascii() and width.isdigit() and height.isascii() and height.isdigit()):
        raise SettingsError(f"{source}={text!r}: expected WIDTHxHEIGHT, e.g. 1024x1024")
    if not (0 < int(width) <= 65536 and 0 < int(height) <= 65536):
        raise SettingsError(f"{source}={text!r}: width and height must be positive")
    return int(width), int(height)


def _ordered(obj: object, smaller: str, larger: str) -> None:
    low, high = getattr(obj, smaller), getattr(obj, larger)
    if not low < high:
        raise SettingsError(f"{flag_name(smaller)} ({low}) must be below {flag_name(larger)} ({high})")


def _check_http(obj: HttpServerSettings, max_body_mb: float) -> None:
    if obj.max_buffered_mb < max_body_mb:
        raise SettingsError(
            f"--max-buffered-mb ({obj.max_buffered_mb}) must be at least --max-body-mb ({max_body_mb}): "
            "otherwise a body of the largest allowed size could never be read"
        )


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None or value <= 0:
            raise SettingsError(f"{flag_name(name)} / {env_name(name)} must be positive, got {value!r}")


# --- building flags and parsing values ---------------------------------------------------------


def add_arguments(
    parser: argparse.ArgumentParser, cls: type[Any], *, exclude: Iterable[str] = (), title: str | None = None
) -> None:
    """Add one flag per setting of ``cls``; flags default to None so the environment can fill in."""
    group = parser.add_argument_group(title or cls.__name__)
    skip = set(exclude)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = _base_type(hints[f.name])
        shown = "unset" if f.default is None else ("" if f.metadata.get("secret") else repr(f.default))
        help_text = f"{f.metadata['help']} [env {env_name(f.name)}; default {shown or 'none'}]"
        if kind is bool:
            group.add_argument(
                flag_name(f.name),
                dest=f.name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
        else:
            group.add_argument(
                flag_name(f.name),
                dest=f.name,
                default=None,
                metavar=f.name.upper(),
                choices=f.metadata.get("choices"),
                help=help_text,
            )


def load(
    cls: type[T],
    args: argparse.Namespace | Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> T:
    """Build ``cls`` from (highest first) ``overrides``, parsed flags, the environment, defaults."""
    env = os.environ if env is None else env
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in overrides:
            values[f.name] = overrides[f.name]
            continue
        raw = given.get(f.name)
        source = flag_name(f.name)
        if raw is None and env_name(f.name) in env:
            raw, source = env[env_name(f.name)], env_name(f.name)
        if raw is None:
            continue
        values[f.name] = parse_value(hints[f.name], raw, source, f.metadata.get("choices"))
    try:
        return cls(**values)
    except TypeError as exc:  # an unknown override
        raise SettingsError(str(exc)) from exc


def parse_value(hint: Any, raw: Any, source: str, choices: tuple[str, ...] | None = None) -> Any:
    """Parse one raw flag or environment value into the setting's type."""
    if not isinstance(raw, str):
        return raw
    kind = _base_type(hint)
    optional = _is_optional(hint)
    text = raw.strip()
    if optional and text.lower() in ("", "none", "null"):
        return None
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is tuple:
            return tuple(part.strip() for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise SettingsError(f"{source}={raw!r}: {exc}") from None
    if choices and text not in choices:
        raise SettingsError(f"{source}={raw!r}: choose one of {', '.join(choices)}")
    return text


def _is_optional(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


def _base_type(hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _base_type(inner)
    if origin is tuple:
        return tuple
    return hint


def to_arguments(obj: object, *, exclude: Iterable[str] = ()) -> list[str]:
    """Every setting of ``obj`` as an explicit command-line flag, the inverse of :func:`load`.

    Local mode and the operator start pods with these (flags beat any ``IMAGEFLEET_*`` variable
    the child inherits). Unset optional settings are left out (the child's default is unset
    too); secret settings are never rendered, since command lines are visible to every process
    on a machine and in every pod spec.
    """
    skip = set(exclude)
    args: list[str] = []
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        if f.name in skip or f.metadata.get("secret"):
            continue
        value = getattr(obj, f.name)
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(flag_name(f.name) if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, tuple):
            args += [flag_name(f.name), ",".join(map(str, value))]
        else:
            args += [flag_name(f.name), str(value)]
    return args


def describe(obj: object) -> dict[str, Any]:
    """Settings as a dict for logs, with secrets masked."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        out[f.name] = ("***" if value else value) if f.metadata.get("secret") else value
    return out
