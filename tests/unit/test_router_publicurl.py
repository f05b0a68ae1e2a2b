"""Where returned image URLs point: configured base, trusted proxies' headers, or the request's Host."""

from __future__ import annotations

from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from imagefleet import wire
from imagefleet.router.publicurl import forwarded_for, networks, public_base
from imagefleet.settings import RouterSettings, SettingsError, load

PROXY = "10.1.2.3"
CLIENT = "203.0.113.9"
FORWARDED = {
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "images.example.com",
    "X-Forwarded-Prefix": "/gen",
    "X-Forwarded-For": "198.51.100.7",
}


def request(remote: str, headers: dict[str, str], host: str = "router.internal:8000") -> web.Request:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: {
        "peername": (remote, 5555),
        "sockname": ("10.0.0.1", 8000),
    }.get(name, default)
    return make_mocked_request(
        "POST", "/v1/images/generations", headers={"Host": host, **headers}, transport=transport
    )


def test_forwarded_headers_from_anyone_are_ignored() -> None:
    req = request(CLIENT, FORWARDED)
    assert public_base(req, None, ()) == "http://router.internal:8000"
    assert public_base(req, None, networks(["10.0.0.0/8"])) == "http://router.internal:8000"
    assert forwarded_for(req, networks(["10.0.0.0/8"])) == CLIENT


def test_forwarded_headers_from_a_trusted_proxy_are_used() -> None:
    req = request(PROXY, FORWARDED)
    trusted = networks(["10.0.0.0/8"])
    assert public_base(req, None, trusted) == "https://images.example.com/gen"
    assert forwarded_for(req, trusted) == f"198.51.100.7, {PROXY}"


@pytest.mark.parametrize(
    "prefix", ["/gen/../admin", "/..", "/./x", "//evil.example.com", "/a%2e%2e", "/a?b", "/a b", "gen"]
)
def test_a_forwarded_prefix_with_path_tricks_is_ignored(prefix: str) -> None:
    req = request(PROXY, {**FORWARDED, "X-Forwarded-Prefix": prefix})
    assert public_base(req, None, networks([PROXY])) == "https://images.example.com"


@pytest.mark.parametrize("host", ["evil.example.com/x", "a@b", "x y", "", "h:99999999"])
def test_a_malformed_host_never_leaks_an_internal_address(host: str) -> None:
    req = request(PROXY, {**FORWARDED, "X-Forwarded-Host": host})
    assert public_base(req, None, networks([PROXY])) == "https://router.internal:8000/gen"
    bad_host = request(CLIENT, {}, host="<bad host>")
    assert public_base(bad_host, None, ()) == "http://10.0.0.1:8000"


def test_the_configured_base_wins() -> None:
    req = request(PROXY, FORWARDED)
    assert public_base(req, "https://img.example.org/v/", networks([PROXY])) == "https://img.example.org/v"


def test_every_base_produced_is_one_the_pod_accepts() -> None:
    for remote in (PROXY, CLIENT):
        for headers in (FORWARDED, {}, {"X-Forwarded-Host": "x..y", "X-Forwarded-Prefix": "/a/b"}):
            base = public_base(request(remote, headers), None, networks([PROXY]))
            assert wire.valid_public_base(base), base


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("trusted_proxies", ("not-an-ip",)),
        ("public_base_url", "ftp://x"),
        ("public_base_url", "https://h/a/../b"),
        ("url_signing_key", "short"),
    ],
)
def test_settings_refuse_unusable_values(field: str, value: object) -> None:
    with pytest.raises(SettingsError):
        load(RouterSettings, {}, env={}, **{field: value})
