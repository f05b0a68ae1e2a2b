"""The chart's values, their schema and the operator's settings agree, and nothing is said twice.

The operator's settings (:class:`~imagefleet.settings.OperatorSettings`) are the one source of its
defaults: values.yaml may not repeat one, ``operator.settings`` accepts exactly the settings'
names with their bounds and choices (values.schema.json), and the few defaults the Deployment
itself must know (a container port, a grace period, a Lease name) are the settings' own.
Rendering and the real apiserver are checked in tests/cluster/test_chart.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagefleet.settings import OperatorSettings

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "imagefleet"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
ALL_ON = yaml.safe_load((CHART / "ci" / "all-on-values.yaml").read_text())
FIELDS = {f.name: f for f in dataclasses.fields(OperatorSettings)}
HINTS = typing.get_type_hints(OperatorSettings)
SETTINGS_SCHEMA = SCHEMA["properties"]["operator"]["properties"]["settings"]

DEDICATED = {
    "namespaces": ("watchNamespaces",),
    "default_image": ("generatorDefaults", "podImage"),
    "router_image": ("generatorDefaults", "routerImage"),
    "image_pull_policy": ("generatorDefaults", "imagePullPolicy"),
    "leader_election": ("operator", "leaderElection"),
}
"""Settings with a value of their own (path in values.yaml), not accepted in operator.settings."""

JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", tuple: "array"}


def _at(values: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        values = values[key]
    return values


def _leaves(values: Any, schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """(dotted path, value, schema) of every value the schema declares, down to free-form maps."""
    props = schema.get("properties")
    if isinstance(values, dict) and values and props and path != "operator.settings":
        for key, value in values.items():
            assert key in props, f"{path}.{key}".lstrip(".") + " is not in values.schema.json"
            yield from _leaves(value, props[key], f"{path}.{key}" if path else key)
    else:
        yield path, values, schema


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _base(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is tuple:
        return tuple
    return _base(args[0]) if args else hint


# --- values and schema ------------------------------------------------------------------------


def test_every_top_level_value_is_in_the_schema() -> None:
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert SCHEMA["additionalProperties"] is False
    assert set(VALUES) <= set(SCHEMA["properties"])


@pytest.mark.parametrize("values", [VALUES, ALL_ON], ids=["values.yaml", "ci/all-on-values.yaml"])
def test_every_value_is_declared_with_its_type(values: dict[str, Any]) -> None:
    for path, value, schema in _leaves(values, SCHEMA):
        declared = schema["type"]
        kinds: list[str] = [declared] if isinstance(declared, str) else list(declared)
        python: dict[str, type | tuple[type, ...]] = {
            "string": str,
            "integer": int,
            "number": (int, float),
            "boolean": bool,
            "array": list,
            "object": dict,
            "null": type(None),
        }
        assert any(isinstance(value, python[k]) for k in kinds), f"{path}: {value!r} is not {kinds}"
        if "enum" in schema:
            assert value in schema["enum"], f"{path}: {value!r} not in {schema['enum']}"


def test_objects_with_known_keys_allow_no_others() -> None:
    def walk(schema: dict[str, Any], path: str) -> Iterator[str]:
        if "properties" in schema:
            if schema.get("additionalProperties") is not False:
                yield path
            for key, sub in schema["properties"].items():
                yield from walk(sub, f"{path}.{key}")

    assert list(walk(SCHEMA, "")) == []


def test_every_value_has_a_comment() -> None:
    """Each key that the schema declares is preceded by a comment line in values.yaml."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    declared = {path.split(".")[-1] for path, _, _ in _leaves(VALUES, SCHEMA)}
    declared |= {part for path, _, _ in _leaves(VALUES, SCHEMA) for part in path.split(".")[:-1]}
    uncommented = []
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9]*):", line)
        if match and match.group(2) in declared and len(match.group(1)) <= 4:
            before = lines[i - 1].strip() if i else ""
            if not before.startswith("#"):
                uncommented.append(line.strip())
    assert uncommented == []


def test_the_readme_lists_every_value() -> None:
    readme = (CHART / "README.md").read_text()
    listed = set(re.findall(r"^\| `([A-Za-z0-9.]+)` \|", readme, re.M))
    paths = {path for path, _, _ in _leaves(VALUES, SCHEMA)}
    assert paths - listed == set(), "values missing from charts/imagefleet/README.md"
    assert {p for p in listed if "." in p or p in VALUES} - paths == set(), "README lists unknown values"


def test_optional_features_are_off_and_resources_unset() -> None:
    assert VALUES["operator"]["resources"] == {}
    for feature in ("serviceMonitor", "prometheusRule", "exampleGenerator"):
        assert VALUES[feature]["enabled"] is False, feature


# --- one source of defaults: the operator's settings ------------------------------------------


def test_no_operator_default_is_declared_again() -> None:
    """An operator default appears nowhere in values.yaml: not as a camelCase key, not as a value."""
    assert VALUES["operator"]["settings"] == {}
    for name, where in DEDICATED.items():
        if name != "leader_election":  # the chart's choice, not the operator's default (False)
            assert _at(VALUES, where) in ("", [], None), (
                f"{'.'.join(where)} repeats the default of --{name.replace('_', '-')}"
            )

    def walk(node: Any, path: str) -> Iterator[tuple[str, str, Any]]:
        if isinstance(node, dict):
            for key, value in node.items():
                yield path, key, value
                yield from walk(value, f"{path}.{key}")

    defaults = {f.default for f in FIELDS.values() if isinstance(f.default, str) and len(f.default) > 8}
    for path, key, value in walk(VALUES, ""):
        name = _snake(key)
        if name in FIELDS and key != "replicas":
            assert value != FIELDS[name].default, f"{path}.{key}: {value!r} is the operator's default"
        if isinstance(value, str):
            assert value not in defaults, f"{path}.{key}: {value!r} is an operator default"


def test_operator_settings_schema_is_the_settings() -> None:
    """operator.settings accepts each setting by name, with its type, bounds and choices."""
    props = SETTINGS_SCHEMA["properties"]
    assert SETTINGS_SCHEMA["additionalProperties"] is False
    assert set(props) <= set(FIELDS), f"not OperatorSettings fields: {set(props) - set(FIELDS)}"
    assert set(props) & set(DEDICATED) == set(), "these have values of their own"
    missing = set(FIELDS) - set(props) - set(DEDICATED)
    assert missing == set(), f"OperatorSettings fields the chart cannot set: {missing}"
    for name, prop in props.items():
        meta = FIELDS[name].metadata
        kinds = [prop["type"]] if isinstance(prop["type"], str) else prop["type"]
        assert JSON_TYPES[_base(HINTS[name])] in kinds, name
        assert ("null" in kinds) == (type(None) in typing.get_args(HINTS[name])), name
        assert prop.get("minimum") == meta.get("minimum"), f"minimum of {name}"
        assert prop.get("maximum") == meta.get("maximum"), f"maximum of {name}"
        choices = [c for c in prop.get("enum", []) if c is not None] or None
        assert (tuple(choices) if choices else None) == meta.get("choices"), f"choices of {name}"


def test_documented_settings_examples_are_settings() -> None:
    """Every setting named in values.yaml's comments and the chart README exists."""
    text = (CHART / "values.yaml").read_text() + (CHART / "README.md").read_text()
    block = text[text.index("  settings:") - 1200 : text.index("  settings: {}")]
    named = set(re.findall(r"^\s*#   ([a-z][a-z0-9_]+):", block, re.M))
    readme = (CHART / "README.md").read_text()
    named |= set(re.findall(r"^    ([a-z][a-z0-9_]+): ", readme, re.M))
    assert named, "the examples were not found"
    assert named - set(FIELDS) == set()


def test_the_settings_the_deployment_must_know_are_the_operators_defaults() -> None:
    """health_port, stop_timeout_s and lease_name shape the Deployment and RBAC; same defaults."""
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    block = re.search(r'define "imagefleet.operatorDefaults" -}}\n(.*?)\n{{- end }}', helpers, re.S)
    assert block is not None
    known = yaml.safe_load(block.group(1))
    assert known == {name: FIELDS[name].default for name in known}


def test_dedicated_settings_are_refused_in_operator_settings() -> None:
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    forbidden = re.search(r"\$forbidden := list (.*?) }}", deployment)
    assert forbidden is not None
    assert set(re.findall(r'"([a-z_]+)"', forbidden.group(1))) == set(DEDICATED)


def test_all_on_values_set_every_dedicated_value() -> None:
    for name, path in DEDICATED.items():
        value = _at(ALL_ON, path)
        if name == "leader_election":  # false there: replicas 2 must turn it on regardless
            continue
        assert value not in ("", [], None, FIELDS[name].default), f"ci/all-on-values.yaml: {'.'.join(path)}"
    for feature in ("serviceMonitor", "prometheusRule", "exampleGenerator"):
        assert ALL_ON[feature]["enabled"] is True, feature


# --- chart metadata ----------------------------------------------------------------------------


def test_chart_version_and_images_agree_with_the_operator() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "imagefleet"
    app = chart["appVersion"]
    # The operator image (tag: appVersion) defaults its pods and routers to images of its version.
    assert FIELDS["default_image"].default == f"ghcr.io/imagefleet/imagefleet:{app}"
    assert FIELDS["router_image"].default == f"{VALUES['operator']['image']['repository']}:{app}"


def test_the_chart_crd_is_the_repository_crd() -> None:
    link = CHART / "crds" / "imagegenerator.yaml"
    assert link.resolve() == (REPO / "crds" / "imagegenerator.yaml").resolve()
    if link.is_symlink():  # relative, so it holds in every checkout and in packaged charts
        assert not Path(link.readlink()).is_absolute()
