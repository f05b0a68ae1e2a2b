"""The router's runtime state, held in the aiohttp app under one typed key."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from imagefleet.router.auth import KeyStore
from imagefleet.router.loadview import LoadView
from imagefleet.router.pick import Picker
from imagefleet.router.publicurl import Network
from imagefleet.router.signing import UrlSigner
from imagefleet.router.telemetry import RouterMetrics
from imagefleet.settings import RouterSettings


@dataclass
class RouterRuntime:
    settings: RouterSettings
    view: LoadView
    metrics: RouterMetrics
    keys: KeyStore
    picker: Picker
    signer: UrlSigner
    trusted: tuple[Network, ...] = ()
    """``trusted_proxies``, parsed."""
    rng: random.Random = field(default_factory=random.Random)
    session: aiohttp.ClientSession | None = None
    """Created when the app starts (it needs the running loop); one connection pool for all pods."""

    @property
    def client(self) -> aiohttp.ClientSession:
        assert self.session is not None, "the router app has not started"
        return self.session


RUNTIME = web.AppKey("router_runtime", RouterRuntime)
