"""The ``imagefleet`` command (also ``python -m imagefleet``).

Subcommands:

* ``pod``    -- one inference pod: one model on one GPU (or the CPU);
* ``router`` -- the router in front of pods (static list or Kubernetes discovery);
* ``serve``  -- local mode: a router plus one pod process per GPU;
* ``operator`` -- the Kubernetes operator (ImageGenerator resources to pods, router, status);
* ``generate`` -- make images through a router (:mod:`imagefleet.generate`).

Flags come from the settings dataclasses in :mod:`imagefleet.settings`; each flag may also be set
with its ``IMAGEFLEET_<NAME>`` environment variable.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from imagefleet import __version__, generate, settings
from imagefleet.settings import (
    HttpServerSettings,
    OperatorSettings,
    PodSettings,
    RouterSettings,
    ServeSettings,
    SettingsError,
)

POD_EXTRAS = frozenset(("torch", "diffusers", "transformers", "accelerate", "PIL"))
"""What ``pip install 'imagefleet[pod]'`` adds: the control-plane image has none of them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagefleet", description="Self-hosted image generation that scales out."
    )
    parser.add_argument("--version", action="version", version=f"imagefleet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    pod = sub.add_parser("pod", help="run one inference pod (one model, one GPU or the CPU)")
    settings.add_arguments(pod, PodSettings, title="pod")

    router = sub.add_parser("router", help="run the router in front of inference pods")
    settings.add_arguments(router, RouterSettings, title="router")

    serve = sub.add_parser("serve", help="local mode: a router plus one pod process per GPU")
    settings.add_arguments(serve, ServeSettings, title="local mode")
    settings.add_arguments(
        serve,
        RouterSettings,
        title="router",
        # local mode sets the router's stop budget from the pods' (it waits while they drain)
        exclude=(
            "discovery",
            "backends",
            "namespace",
            "selector",
            "backend_port",
            "log_level",
            "shutdown_timeout_s",
            "stop_timeout_s",
        ),
    )
    # the HTTP server settings (and the body limit) are the router's flags, and apply to the pods too
    http = tuple(f.name for f in dataclasses.fields(HttpServerSettings))
    settings.add_arguments(
        serve,
        PodSettings,
        title="pods",
        exclude=("host", "port", "device", "max_body_mb", "instance_id", *http),
    )
    operator = sub.add_parser(
        "operator", help="run the Kubernetes operator (ImageGenerator resources to pods and a router)"
    )
    settings.add_arguments(operator, OperatorSettings, title="operator")
    generate_cmd = sub.add_parser("generate", help="make images through a router, with a progress bar")
    generate.add_arguments(generate_cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return generate.main(args)
        if args.command == "pod":
            pod_settings = settings.load(PodSettings, args)
            _logging(pod_settings.log_level)
            from imagefleet.inference_pod.app import serve as serve_pod

            return run(serve_pod(pod_settings))
        if args.command == "router":
            router_settings = settings.load(RouterSettings, args)
            _logging(router_settings.log_level)
            from imagefleet.router.app import serve as serve_router

            return run(serve_router(router_settings))
        if args.command == "serve":
            local = settings.load(ServeSettings, args)
            pod_settings = settings.load(PodSettings, args)
            router_settings = settings.load(RouterSettings, args)
            _logging(pod_settings.log_level)
            from imagefleet.localmode import serve_local

            return run(serve_local(local, router_settings, pod_settings))
        if args.command == "operator":
            operator_settings = settings.load(OperatorSettings, args)
            _logging(operator_settings.log_level)
            from imagefleet.operator.app import run as run_operator

            return run_operator(operator_settings)
    except SettingsError as exc:
        print(f"imagefleet: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name not in POD_EXTRAS:
            raise
        print(
            f"imagefleet {args.command}: {exc.name} is not installed; inference pods need the pod "
            "extras: pip install 'imagefleet[pod]'",
            file=sys.stderr,
        )
        return 2
    raise AssertionError(args.command)


def run(coro: Coroutine[Any, Any, Any]) -> int:
    """Run ``coro`` until it ends or SIGINT/SIGTERM arrives (then cancel it, letting it clean up)."""

    async def runner() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        await coro

    try:
        asyncio.run(runner())
    except asyncio.CancelledError:
        pass
    except KeyboardInterrupt:
        pass
    return 0


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
