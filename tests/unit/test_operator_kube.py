"""Which API failures the operator reports as an outage (one line) rather than with a traceback."""

from __future__ import annotations

import socket

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from imagefleet.operator.kube import unreachable


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_refused_connection_is_an_outage() -> None:
    config = client.Configuration(host=f"https://127.0.0.1:{closed_port()}")
    config.retries = 0
    api = client.CoreV1Api(client.ApiClient(config))
    with pytest.raises(Exception) as caught:  # whatever the client raises for it
        api.list_namespace(_request_timeout=2)
    reason = unreachable(caught.value)
    assert reason is not None
    assert reason.startswith("the API server is unreachable (") and "refused" in reason.lower()
    assert "\n" not in reason


@pytest.mark.parametrize("status", [502, 503, 504])
def test_a_gateway_or_unavailable_answer_is_an_outage(status: int) -> None:
    reason = unreachable(ApiException(status=status, reason="Service Unavailable"))
    assert reason == f"the API server answered {status} Service Unavailable"


@pytest.mark.parametrize(
    "exc",
    [
        ApiException(status=404, reason="Not Found"),
        ApiException(status=422, reason="Invalid"),
        ValueError("x"),
    ],
    ids=["404", "422", "a bug"],
)
def test_other_failures_keep_their_traceback(exc: Exception) -> None:
    assert unreachable(exc) is None
