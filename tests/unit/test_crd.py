"""The CRD and the pod settings agree: one default and one set of bounds per setting.

The apiserver applies the CRD's defaults and bounds; the pod applies PodSettings'. If the two
drifted, a resource the apiserver accepts could start pods that refuse to run (or the other way
round), so every path the operator maps onto a pod setting is checked here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from imagefleet.operator.spec import POD_FIELDS
from imagefleet.settings import PodSettings

REPO = Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((REPO / "crds" / "imagegenerator.yaml").read_text())
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
FIELDS = {f.name: f for f in dataclasses.fields(PodSettings)}


def node(path: tuple[str, ...]) -> dict[str, Any]:
    here: dict[str, Any] = SCHEMA["properties"]["spec"]
    for part in path:
        here = here["properties"][part]
    return here


@pytest.mark.parametrize(("path", "name"), POD_FIELDS, ids=[".".join(p) for p, _ in POD_FIELDS])
def test_crd_default_is_the_setting_default(path: tuple[str, ...], name: str) -> None:
    declared = node(path).get("default")
    default = FIELDS[name].default
    if default is None:
        assert declared is None, f"spec.{'.'.join(path)} has a default the pod does not have"
    elif path == ("model", "id"):
        assert declared is None  # the one required field: no default on either side that matters
    else:
        assert declared == default, f"spec.{'.'.join(path)}: CRD {declared!r}, PodSettings {default!r}"


@pytest.mark.parametrize(("path", "name"), POD_FIELDS, ids=[".".join(p) for p, _ in POD_FIELDS])
def test_crd_bounds_are_the_setting_bounds(path: tuple[str, ...], name: str) -> None:
    meta = FIELDS[name].metadata
    schema = node(path)
    assert schema.get("minimum") == meta.get("minimum"), f"minimum of spec.{'.'.join(path)}"
    assert schema.get("maximum") == meta.get("maximum"), f"maximum of spec.{'.'.join(path)}"


@pytest.mark.parametrize(("path", "name"), POD_FIELDS, ids=[".".join(p) for p, _ in POD_FIELDS])
def test_crd_enums_are_the_setting_choices(path: tuple[str, ...], name: str) -> None:
    choices = FIELDS[name].metadata.get("choices")
    enum = node(path).get("enum")
    assert (tuple(enum) if enum else None) == choices


def test_every_pod_field_of_the_crd_is_mapped() -> None:
    mapped = {path for path, _ in POD_FIELDS}
    for group in ("batching", "defaults", "limits", "model"):
        for key in node((group,))["properties"]:
            assert (group, key) in mapped, f"spec.{group}.{key} is not mapped onto a pod setting"


def test_every_field_is_described() -> None:
    missing: list[str] = []

    def walk(schema: dict[str, Any], where: str) -> None:
        for key, sub in (schema.get("properties") or {}).items():
            here = f"{where}.{key}"
            if "description" not in sub and where.startswith(".spec") and key not in ("requests", "limits"):
                missing.append(here)
            walk(sub, here)
        if "items" in schema:
            walk(schema["items"], where + "[]")

    walk(SCHEMA["properties"]["spec"], ".spec")
    assert not missing, f"fields without a description: {missing}"


def test_the_chart_ships_the_same_crd() -> None:
    chart_crd = REPO / "charts" / "imagefleet" / "crds" / "imagegenerator.yaml"
    assert chart_crd.read_bytes() == (REPO / "crds" / "imagegenerator.yaml").read_bytes()


class _Strict(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _no_repeats(loader: _Strict, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice", key_node.start_mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_repeats)

PLAIN_YAML = sorted(
    p
    for pattern in (
        "crds/*.yaml",
        "examples/*.yaml",
        "charts/imagefleet/*.yaml",
        "charts/imagefleet/ci/*.yaml",
    )
    for p in REPO.glob(pattern)
)


def test_the_strict_loader_refuses_a_repeated_key() -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match="'a' given twice"):
        yaml.load("x:\n  a: 1\n  a: 2\n", Loader=_Strict)


@pytest.mark.parametrize("path", PLAIN_YAML, ids=[str(p.relative_to(REPO)) for p in PLAIN_YAML])
def test_no_key_is_given_twice(path: Path) -> None:
    """A repeated key is silently dropped by lenient parsers and refused by strict ones."""
    for _ in yaml.load_all(path.read_text(), Loader=_Strict):
        pass
