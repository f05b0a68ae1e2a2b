"""Reading inference pods' ``/metrics``: concurrent fetches with a timeout, prometheus-client's parser.

A page is cut down to the sample lines the status uses before it is parsed (a line filter on
metric names; the parsing itself is prometheus_client's): a tenth of a real pod's page, which keeps
a status cycle over a thousand pods cheap.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp

from imagefleet import metrics as m
from imagefleet import wire

USED = (
    m.POD_QUEUED_SAMPLES,
    m.POD_QUEUED_SECONDS,
    m.POD_RUNNING_SAMPLES,
    m.POD_QUARANTINED,
    m.POD_READY,
    m.POD_IMAGES,
    m.POD_BATCH_SECONDS,
)


@dataclass(frozen=True)
class PodMetrics:
    """What one scrape of one pod says."""

    queued: int
    queued_seconds: float
    running: int
    quarantined: bool
    ready: bool
    completed: int
    failed: int
    batches: int
    batch_seconds: float

    @property
    def avg_batch_seconds(self) -> float:
        return self.batch_seconds / self.batches if self.batches else 0.0


def _wanted(line: str) -> bool:
    """Sample lines of the families the status reads, histogram buckets, creation times and comments left out
    (a histogram's ``_sum`` and ``_count`` are all it needs; untyped, they parse the same)."""
    return line.startswith(USED) and not line.startswith(_SKIPPED)


_SKIPPED = tuple(name + suffix for name in USED for suffix in ("_bucket", "_created"))


def summarize(text: str) -> PodMetrics:
    """A /metrics page as the numbers the status needs; ValueError if it is not Prometheus text."""
    kept = "\n".join(line for line in text.splitlines() if _wanted(line))
    scrape = m.parse(kept + "\n")
    return PodMetrics(
        queued=int(scrape.value(m.POD_QUEUED_SAMPLES)),
        queued_seconds=float(scrape.value(m.POD_QUEUED_SECONDS)),
        running=int(scrape.value(m.POD_RUNNING_SAMPLES)),
        quarantined=scrape.value(m.POD_QUARANTINED) >= 1,
        ready=scrape.value(m.POD_READY) >= 1,
        completed=int(scrape.value(m.POD_IMAGES + "_total", outcome=m.OUTCOME_COMPLETED)),
        failed=int(scrape.value(m.POD_IMAGES + "_total", outcome=m.OUTCOME_FAILED)),
        batches=int(scrape.value(m.POD_BATCH_SECONDS + "_count")),
        batch_seconds=float(scrape.value(m.POD_BATCH_SECONDS + "_sum")),
    )


class Scraper:
    """Fetches pods' metrics over one connection pool, at most ``concurrency`` at a time."""

    def __init__(self, session: aiohttp.ClientSession, timeout_s: float, concurrency: int) -> None:
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.limit = asyncio.Semaphore(concurrency)

    async def scrape(self, ip: str, port: int) -> PodMetrics | None:
        """One pod's metrics, or None when it does not answer in time or answers nonsense."""
        host = f"[{ip}]" if ":" in ip else ip
        url = f"http://{host}:{port}{wire.METRICS_PATH}"
        async with self.limit:
            try:
                async with self.session.get(url, timeout=self.timeout) as response:
                    if response.status != 200:
                        return None
                    text = await response.text()
            except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
                return None
        try:
            return summarize(text)
        except (ValueError, TypeError):
            return None

    async def scrape_all(self, targets: dict[str, tuple[str, int]]) -> dict[str, PodMetrics | None]:
        """``{pod name: (ip, port)}`` -> ``{pod name: metrics or None}``, fetched concurrently."""
        names = list(targets)
        results = await asyncio.gather(*(self.scrape(*targets[n]) for n in names))
        return dict(zip(names, results, strict=True))
