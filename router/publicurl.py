"""Where returned image URLs point, and whose forwarding headers to believe.

The pod builds the URLs of ``response_format=url`` from one header the router sets,
:data:`~imagefleet.wire.PUBLIC_BASE_HEADER`, and never from what a client sent. Its value is,
first found:

1. ``public_base_url`` from the settings (the address clients are meant to use);
2. ``X-Forwarded-Proto`` / ``X-Forwarded-Host`` / ``X-Forwarded-Prefix`` (first value of each),
   but only when the connection comes from one of ``trusted_proxies`` (addresses or CIDRs;
   none by default), and each only when well formed: a prefix with ``..``, ``.``, an empty
   segment, a percent-escape or anything outside ``A-Z a-z 0-9 . _ ~ -`` is ignored;
3. the scheme and ``Host`` of the request the router received (a malformed Host: the router's own
   listening address).

``X-Forwarded-For`` is passed on as the client's address appended to what a trusted proxy said
(from anyone else, only the client's address).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from aiohttp import web

from imagefleet import wire

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(proxies: Iterable[str]) -> tuple[Network, ...]:
    """``trusted_proxies`` parsed (the settings checked them already)."""
    return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in proxies)


def trusted(remote: str | None, proxies: Sequence[Network]) -> bool:
    if not remote or not proxies:
        return False
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return False
    return any(address in net for net in proxies)


def _first(value: str | None) -> str:
    return (value or "").split(",")[0].strip()


def public_base(request: web.Request, configured: str | None, proxies: Sequence[Network]) -> str:
    """``scheme://host[/prefix]`` for the URLs of this request's images (see the module docstring)."""
    if configured:
        return configured.rstrip("/")
    scheme = request.scheme if request.scheme in ("http", "https") else "http"
    host = request.host
    prefix = ""
    if trusted(request.remote, proxies):
        h = request.headers
        proto = _first(h.get("X-Forwarded-Proto")).lower()
        if proto in ("http", "https"):
            scheme = proto
        forwarded_host = _first(h.get("X-Forwarded-Host"))
        if forwarded_host and wire.valid_public_host(forwarded_host):
            host = forwarded_host
        forwarded_prefix = _first(h.get("X-Forwarded-Prefix")).rstrip("/")
        if wire.valid_public_prefix(forwarded_prefix):
            prefix = forwarded_prefix
    if not wire.valid_public_host(host):
        host = _own_address(request)
    return f"{scheme}://{host}{prefix}"


def _own_address(request: web.Request) -> str:
    """``host:port`` the router listens on, for a request whose Host cannot be used."""
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        host, port = str(sockname[0]), int(sockname[1])
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return "localhost"


def forwarded_for(request: web.Request, proxies: Sequence[Network]) -> str:
    """The X-Forwarded-For to send on: a trusted proxy's chain plus the peer's address."""
    chain = request.headers.get("X-Forwarded-For") if trusted(request.remote, proxies) else None
    return ", ".join(x.strip() for x in (chain, request.remote) if x and x.strip())
