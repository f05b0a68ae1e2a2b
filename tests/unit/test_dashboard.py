"""The chart's Grafana dashboard: valid, built only on documented metrics, covering what operators watch.

Whether every queried metric is really exposed by a running router and pod is checked against
local mode in tests/component/test_web.py; rendering the ConfigMap, in tests/cluster/test_chart.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from imagefleet import metrics as m
from imagefleet.testing import dashboards

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = dashboards.load()
QUERIED = {name for _, expr in dashboards.expressions(DASHBOARD) for name in dashboards.metric_names(expr)}
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("",), "gauge": ("",), "info": ("",)}


def documented() -> set[str]:
    """Series names of the metric tables of docs/metrics.md (a histogram as its three series)."""
    rows = re.findall(r"^\| `(imagefleet_\w+)` \| (\w+) \|", (REPO / "docs" / "metrics.md").read_text(), re.M)
    assert len(rows) > 15
    return {name + suffix for name, kind in rows for suffix in SUFFIXES[kind]}


def test_every_query_parses_and_reads_only_documented_metrics() -> None:
    exprs = list(dashboards.expressions(DASHBOARD))
    assert len(exprs) > 25
    missing = QUERIED - documented()
    assert not missing, sorted(missing)


@pytest.mark.parametrize(
    "series",
    [
        m.POD_IMAGES + "_total",  # images per minute, errors by outcome
        m.POD_QUEUED_SAMPLES,  # queue depth
        m.POD_QUEUED_SECONDS,  # queued GPU-seconds
        m.POD_BATCH_SIZE + "_bucket",
        m.POD_BATCH_SECONDS + "_bucket",
        m.POD_QUEUE_WAIT_SECONDS + "_bucket",
        m.POD_REQUEST_SECONDS + "_bucket",
        m.ROUTER_REQUEST_SECONDS + "_bucket",
        m.POD_ERRORS + "_total",
        m.POD_QUARANTINED,
        m.POD_READY,
        m.ROUTER_REQUESTS + "_total",  # router picks
        m.ROUTER_RETRIES + "_total",
    ],
)
def test_the_dashboard_shows(series: str) -> None:
    assert series in QUERIED


def test_panels_have_unique_ids_and_use_the_chosen_data_source() -> None:
    panels = list(dashboards.panels(DASHBOARD))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        assert all('namespace=~"$namespace"' in t["expr"] for t in panel["targets"]), panel["title"]
    variables = {v["name"] for v in DASHBOARD["templating"]["list"]}
    assert variables == {"datasource", "namespace", "generator"}


def test_the_reader_refuses_what_would_hide_a_metric() -> None:
    assert dashboards.metric_names('sum by (kind) (rate(a_total{x="$namespace"}[$__rate_interval])) / b') == {
        "a_total",
        "b",
    }
    with pytest.raises(ValueError, match="without a metric name"):
        dashboards.metric_names('{__name__=~"imagefleet_.*"}')
    with pytest.raises(KeyError, match="unknown dashboard variable"):
        dashboards.metric_names("rate(a[$nope])")
    with pytest.raises(ValueError):
        dashboards.metric_names("rate(a_total)")  # rate of an instant vector: Prometheus refuses it too
