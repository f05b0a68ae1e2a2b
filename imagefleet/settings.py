"""One typed settings object per process, parsed once from flags and the environment.

Every setting is a dataclass field declared with :func:`setting`: its type, its one default, its
help text and the environment variable that may set it (``IMAGEFLEET_<NAME>``). The CLI builds its
flags from these declarations (flag > environment > default) and the result is frozen, so every
other layer receives a finished object and nothing re-declares a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

ENV_PREFIX = "IMAGEFLEET_"

T = TypeVar("T")


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the flag and variable."""


def setting(default: Any, help: str, *, choices: Iterable[str] | None = None, secret: bool = False) -> Any:
    """Declare a setting: a dataclass field carrying its help text (and allowed choices)."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "secret": secret}
    if isinstance(default, (list, dict, set)):
        raise TypeError("settings use immutable defaults (tuples)")
    return field(default=default, metadata=meta)


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


# --- the settings objects --------------------------------------------------------------------


@dataclass(frozen=True)
class PodSettings:
    """An inference pod: one process, one GPU (or the CPU), one model."""

    model: str = setting("tiny", "Hugging Face id, local path, `tiny`, or `synthetic:<arch>`")
    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8001, "port to listen on")
    device: str = setting("auto", "torch device: auto (cuda when present, else cpu), cpu, cuda, cuda:N")
    dtype: str = setting("auto", "weights dtype", choices=("auto", "float32", "float16", "bfloat16"))
    revision: str | None = setting(None, "model revision (branch, tag or commit) for Hugging Face ids")
    variant: str | None = setting(None, "weights variant for Hugging Face ids, e.g. fp16")
    max_batch_size: int = setting(4, "most samples in one pipeline call")
    max_wait_ms: int = setting(
        500, "longest a sample may wait for its batch to fill; only spent when a larger batch pays"
    )
    batch_policy: str = setting(
        "auto",
        "auto: batch where the measured cost curve says it pays; fill: always batch as many as allowed",
        choices=("auto", "fill"),
    )
    max_queued_images: int = setting(64, "queued samples beyond which new requests get 429")
    max_images_per_request: int = setting(10, "largest `n` a request may ask for")
    max_pixels: int = setting(2048 * 2048, "largest width*height a request may ask for")
    max_side: int = setting(4096, "largest width or height a request may ask for")
    max_steps: int = setting(150, "largest num_inference_steps a request may ask for")
    max_prompt_chars: int = setting(4000, "longest prompt or negative prompt, in characters")
    max_body_mb: float = setting(32.0, "largest request body (uploads included), in MiB")
    default_steps: int | None = setting(None, "steps when a request names none (model default if unset)")
    default_guidance: float | None = setting(
        None, "guidance scale when a request names none (model default if unset)"
    )
    file_ttl_s: float = setting(3600.0, "how long images of response_format=url stay downloadable")
    file_store_mb: float = setting(512.0, "memory for images kept for response_format=url, in MiB")
    encode_workers: int = setting(4, "threads that encode images (PNG/JPEG/WebP) and base64")
    quarantine_after: int = setting(3, "consecutive failed batches after which the pod quarantines itself")
    warmup: bool = setting(True, "run and time small batches at start-up before reporting ready")
    compile: bool = setting(False, "torch.compile the denoiser (GPU only; slow first start)")
    fault_injection: bool = setting(False, "enable the /debug/faults test hook (never in production)")
    log_level: str = setting("info", "log level", choices=("debug", "info", "warning", "error"))

    def __post_init__(self) -> None:
        _positive(self, "port", "max_batch_size", "max_queued_images", "max_images_per_request")
        _positive(self, "max_pixels", "max_side", "max_steps", "max_prompt_chars", "max_body_mb")
        _positive(self, "encode_workers", "quarantine_after", "file_store_mb")
        _non_negative(self, "max_wait_ms", "file_ttl_s")
        if self.default_steps is not None:
            _positive(self, "default_steps")
        if self.max_queued_images < self.max_images_per_request:
            raise SettingsError(
                f"--max-queued-images ({self.max_queued_images}) must be at least "
                f"--max-images-per-request ({self.max_images_per_request})"
            )

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


@dataclass(frozen=True)
class RouterSettings:
    """The router: the one address clients use, in front of every pod of one model."""

    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8000, "port to listen on")
    discovery: str = setting("static", "where backends come from", choices=("static", "kubernetes"))
    backends: tuple[str, ...] = setting((), "static backends, comma separated base URLs")
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
    max_body_mb: float = setting(32.0, "largest request body (uploads included), in MiB")
    log_level: str = setting("info", "log level", choices=("debug", "info", "warning", "error"))

    def __post_init__(self) -> None:
        _positive(self, "port", "backend_port", "poll_interval_ms", "request_timeout_s", "max_attempts")
        _positive(self, "eject_after", "backoff_s", "backoff_max_s", "max_body_mb")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


@dataclass(frozen=True)
class ServeSettings:
    """Local mode: a router plus one pod process per GPU, on one machine."""

    gpus: str = setting("all", "GPUs to use: all, none, or a comma separated list such as 0,1")
    pod_base_port: int = setting(8101, "first port of the pod processes (one per GPU)")
    restart_backoff_s: float = setting(1.0, "pause before a crashed pod process is restarted")
    cpu_pods: int = setting(
        1, "pod processes to run when no GPU is used (CPU demos, tests, benchmark smoke runs)"
    )

    def __post_init__(self) -> None:
        _positive(self, "pod_base_port", "cpu_pods")


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None or value <= 0:
            raise SettingsError(f"{flag_name(name)} / {env_name(name)} must be positive, got {value!r}")


def _non_negative(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 0:
            raise SettingsError(f"{flag_name(name)} / {env_name(name)} must be >= 0, got {value!r}")


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


def describe(obj: object) -> dict[str, Any]:
    """Settings as a dict for logs, with secrets masked."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        out[f.name] = ("***" if value else value) if f.metadata.get("secret") else value
    return out
