"""The chart's Grafana dashboard, read as Grafana reads it: every PromQL expression and its metrics.

Expressions are parsed with ``promql-parser`` (the Rust PromQL parser's Python binding), after
Grafana's own variables are replaced by values Prometheus would see, so a query that Prometheus
would refuse fails here too. Every selector must name its metric: a ``{__name__=~...}`` selector
would hide what it reads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import promql_parser

DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "imagefleet" / "dashboards" / "imagefleet.json"

GRAFANA_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "30s",
    "__range": "1h",
    "namespace": ".*",
    "generator": ".*",
}
"""What Grafana puts in place of ``$name`` / ``${name}`` before sending a query."""

_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")
_CHILDREN = ("lhs", "rhs", "expr", "args", "vector_selector", "param")


def load(path: Path = DASHBOARD) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def panels(dashboard: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in dashboard.get("panels", ()):
        yield panel
        yield from panels(panel)


def expressions(dashboard: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """``(panel title, expr)`` of every query target."""
    for panel in panels(dashboard):
        for target in panel.get("targets", ()):
            if "expr" in target:
                yield str(panel.get("title", "")), str(target["expr"])


def substitute(expr: str, variables: Mapping[str, str] = GRAFANA_VARIABLES) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise KeyError(f"unknown dashboard variable ${name} in {expr!r}")
        return variables[name]

    return _VARIABLE.sub(value, expr)


def metric_names(expr: str) -> set[str]:
    """The metrics one PromQL expression reads (after :func:`substitute`)."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if type(node).__name__ == "VectorSelector":
            if not node.name:
                raise ValueError(f"a selector without a metric name in {expr!r}")
            names.add(str(node.name))
        for attr in _CHILDREN:
            child = getattr(node, attr, None)
            for item in child if isinstance(child, list) else [child]:
                if item is not None and not isinstance(item, (str, int, float)):
                    walk(item)

    walk(promql_parser.parse(substitute(expr)))
    return names


def exposed_names(families: Any) -> set[str]:
    """Every series name a scraped page can answer, HELP/TYPE-only families included.

    A counter family is queried as ``<name>_total``, a histogram as ``_bucket``, ``_sum`` and
    ``_count``, an info as ``_info``; a family with no sample yet (a labelled counter before its
    first increment) still declares them.
    """
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "info": ("_info",),
        "summary": ("_sum", "_count"),
    }
    names: set[str] = set()
    for family in families:
        names.add(family.name)
        names.update(family.name + s for s in suffixes.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names
