"""``imagefleet generate``: make images from the command line through a router (or one pod).

Each of the ``-n`` images is one streamed request (``stream: true``, ``n = 1``) with its own seed,
``seed``, ``seed + 1``, ... (the same images a single request with ``n`` and ``seed`` makes), sent
together so that the pod batches them. The streams' progress comments (:mod:`imagefleet.sse`) feed
a progress line on stderr: ``queued: N ahead`` while the images wait in the pod's queue (the fewest
samples ahead of any of them), then a bar of the steps done; each image is written as ``<seed>.<format>`` in the output folder and its
path printed on stdout. Every failure the API can return (401, 400, 404, 413, 429, 5xx), a stream
that breaks off and a server that cannot be reached end in one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from imagefleet import sse
from imagefleet.schema import MAX_SEED
from imagefleet.settings import RouterSettings

KEY_VARIABLES = ("IMAGEFLEET_API_KEY", "OPENAI_API_KEY")
FORMATS = ("png", "jpeg", "webp")
BAR_WIDTH = 30
MAX_IMAGES = 100


def default_url() -> str:
    """The router ``imagefleet serve`` starts, at its default address."""
    fields = {f.name: f.default for f in dataclasses.fields(RouterSettings)}
    return f"http://{fields['host']}:{fields['port']}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="what to draw")
    parser.add_argument("-n", type=int, default=1, help="how many images (default 1)")
    parser.add_argument("--size", help="WIDTHxHEIGHT (default: the model's)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    parser.add_argument("--seed", type=int, help="seed of the first image (default: random)")
    parser.add_argument("--negative-prompt", help="what not to draw")
    parser.add_argument(
        "--guidance-scale", type=float, help="classifier-free guidance (default: the model's)"
    )
    parser.add_argument("--format", choices=FORMATS, default="png", help="image format (default png)")
    parser.add_argument("--model", help="model name (default: whatever is served)")
    parser.add_argument("-o", "--output", default=".", help="folder for the images (default: here)")
    parser.add_argument("--url", default=default_url(), help="router (or pod) address (default %(default)s)")
    parser.add_argument(
        "--api-key", help=f"API key (default: ${KEY_VARIABLES[0]}, else ${KEY_VARIABLES[1]}; none if unset)"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per image (default 600)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


class Failed(Exception):
    """Why the command failed, in one line."""


@dataclass(frozen=True)
class Job:
    url: str
    body: dict[str, Any]
    headers: dict[str, str]
    seed: int


def jobs_of(args: argparse.Namespace, env: dict[str, str]) -> list[Job]:
    if not 1 <= args.n <= MAX_IMAGES:
        raise Failed(f"-n must be between 1 and {MAX_IMAGES}")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED - args.n:
        raise Failed(f"--seed must be between 0 and {MAX_SEED - args.n}")
    first = args.seed if args.seed is not None else random.randrange(2**62)
    key = args.api_key or next((env[v] for v in KEY_VARIABLES if env.get(v)), None)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    fields = {
        "prompt": args.prompt,
        "size": args.size,
        "num_inference_steps": args.steps,
        "negative_prompt": args.negative_prompt,
        "guidance_scale": args.guidance_scale,
        "model": args.model,
        "output_format": args.format,
        "stream": True,
    }
    body = {k: v for k, v in fields.items() if v is not None}
    url = args.url.rstrip("/")
    if not url.endswith("/v1"):
        url += "/v1"
    return [
        Job(url + "/images/generations", {**body, "seed": first + i}, headers, first + i)
        for i in range(args.n)
    ]


class Progress:
    """Steps done over all images, drawn on one stderr line (only on a terminal)."""

    def __init__(self, images: int, out: TextIO, enabled: bool) -> None:
        self.steps: list[tuple[int, int]] = [(0, 0)] * images
        self.ahead: list[int | None] = [None] * images
        self.done = [False] * images
        self.out = out
        self.enabled = enabled and out.isatty()
        self.started = time.monotonic()

    def update(self, index: int, done: int, total: int) -> None:
        self.steps[index] = (done, total)
        self.ahead[index] = None
        self.draw()

    def queued(self, index: int, ahead: int) -> None:
        self.ahead[index] = ahead
        self.draw()

    def finish(self, index: int) -> None:
        self.done[index] = True
        done, total = self.steps[index]
        self.steps[index] = (total or done, total or done)
        self.draw()

    def draw(self) -> None:
        if not self.enabled:
            return
        known = [t for _, t in self.steps if t]
        done = sum(d for d, _ in self.steps)
        total = sum(t or max(known, default=0) for _, t in self.steps)  # not started: like the others
        elapsed = time.monotonic() - self.started
        waiting = [a for a in self.ahead if a is not None]
        if total == 0 and waiting:
            line = f"queued: {min(waiting)} ahead ... {elapsed:.0f} s"
        elif total == 0:
            line = f"waiting for a GPU ... {elapsed:.0f} s"
        else:
            filled = int(BAR_WIDTH * done / total)
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            line = f"[{bar}] {done}/{total} steps, {sum(self.done)}/{len(self.done)} images, {elapsed:.0f} s"
        self.out.write("\r\033[K" + line)
        self.out.flush()

    def close(self) -> None:
        if self.enabled:
            self.out.write("\r\033[K")
            self.out.flush()


async def lines(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The body's lines as they arrive, of any length (an event's base64 is megabytes)."""
    pending = b""
    async for chunk in response.content.iter_any():
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.rstrip(b"\r").decode()
    if pending:
        yield pending.decode()


async def fetch(session: aiohttp.ClientSession, job: Job, index: int, progress: Progress) -> bytes:
    """One image's bytes, from its stream."""
    async with session.post(job.url, json=job.body, headers=job.headers) as response:
        if response.status != 200:
            raise Failed(await _http_error(response))
        if not response.headers.get("Content-Type", "").startswith(sse.CONTENT_TYPE):
            raise Failed(f"{job.url} did not answer with a stream (is it an imagefleet router?)")
        parser = sse.Parser()
        async for line in lines(response):
            for event in parser.feed(line):
                if (step := event.progress()) is not None:
                    progress.update(index, *step)
                elif (ahead := event.queued_ahead()) is not None:
                    progress.queued(index, ahead)
                elif event.name == "error":
                    raise Failed(_message(_json(event.data), "the image failed"))
                elif event.name is not None and event.name.endswith(".completed"):
                    progress.finish(index)
                    return base64.b64decode(_json(event.data)["b64_json"])
    raise Failed("the server closed the stream before the image was done")


async def run(jobs: Sequence[Job], output: Path, timeout: float, progress: Progress) -> list[Path]:
    output.mkdir(parents=True, exist_ok=True)
    client_timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=10)
    async with aiohttp.ClientSession(timeout=client_timeout) as session:
        tasks = [asyncio.create_task(fetch(session, job, i, progress)) for i, job in enumerate(jobs)]
        try:
            images = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    paths = []
    for job, data in zip(jobs, images, strict=True):
        path = output / f"{job.seed}.{job.body['output_format']}"
        path.write_bytes(data)
        paths.append(path)
    return paths


def main(args: argparse.Namespace, env: dict[str, str] | None = None) -> int:
    """Run ``imagefleet generate``; the exit status."""
    progress = Progress(args.n, sys.stderr, not args.no_progress)
    try:
        jobs = jobs_of(args, dict(os.environ) if env is None else env)
        paths = asyncio.run(run(jobs, Path(args.output), args.timeout, progress))
    except Failed as exc:
        progress.close()
        print(f"imagefleet generate: {exc}", file=sys.stderr)
        return 1
    except aiohttp.ClientConnectorError as exc:
        progress.close()
        why = (
            "connection refused (is `imagefleet serve` or a router running there?)"
            if isinstance(exc.os_error, ConnectionRefusedError)
            else exc.os_error.strerror or str(exc.os_error)
        )
        print(f"imagefleet generate: cannot reach {args.url}: {why}", file=sys.stderr)
        return 1
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        progress.close()
        print(f"imagefleet generate: {_describe(exc, args.timeout)}", file=sys.stderr)
        return 1
    progress.close()
    for path in paths:
        print(path)
    return 0


async def _http_error(response: aiohttp.ClientResponse) -> str:
    try:
        body: Any = await response.json(content_type=None)
    except (ValueError, aiohttp.ClientError):
        body = None
    message = _message(body, response.reason or "error")
    retry = response.headers.get("Retry-After")
    if response.status in (429, 503) and retry:
        message += f" (retry after {retry} s)"
    return f"{response.status} {message}"


def _message(body: Any, fallback: str) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return str(message) if message else fallback


def _json(data: str) -> Any:
    try:
        return sse.Event(data=data).json()
    except ValueError:
        raise Failed("the server sent an event that is not JSON") from None


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no image within {timeout:g} s (--timeout)"
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
        return "the server closed the stream before the image was done"
    return f"{type(exc).__name__}: {exc}"
