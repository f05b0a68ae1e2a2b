"""The contracts between processes: file ids, labels and selectors, the CRD's name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from imagefleet import wire

REPO = Path(__file__).resolve().parents[2]


def test_a_composed_file_id_parses_back_to_its_parts() -> None:
    prefix = wire.file_prefix("a1b2c3d4e5")
    file_id = wire.compose_file_id(prefix, "webp", token="tok-en_1")
    assert file_id == "a1b2c3d4e5~tok-en_1.webp"
    parsed = wire.parse_file_id(file_id)
    assert parsed == wire.FileId(key="a1b2c3d4e5", token="tok-en_1", format="webp")
    assert str(parsed) == file_id


def test_a_file_id_without_a_prefix_has_no_key() -> None:
    file_id = wire.compose_file_id("", "png")
    parsed = wire.parse_file_id(file_id)
    assert parsed is not None and parsed.key is None and parsed.format == "png"


def test_new_tokens_are_random() -> None:
    assert len({wire.compose_file_id("", "png") for _ in range(50)}) == 50


@pytest.mark.parametrize(
    "file_id",
    [
        "~AbC9xyz.png",
        "abc~.png",
        "abc~def.gif",
        "a~b~c.png",
        "../../etc~passwd.png",
        "http:~~evil.com~x.png",
        "a" * 300 + "~x.png",
        "x" * 129 + ".png",
        "",
        "abc.png/../x.png",
    ],
)
def test_ids_no_pod_issues_do_not_parse(file_id: str) -> None:
    assert wire.parse_file_id(file_id) is None


@pytest.mark.parametrize("prefix", ["~", "a~b~", "../~", "a b~", "x" * 65 + "~", "abc"])
def test_malformed_prefixes_are_refused(prefix: str) -> None:
    assert not wire.valid_file_prefix(prefix)
    with pytest.raises(ValueError):
        wire.compose_file_id(prefix, "png")


def test_an_empty_prefix_is_valid() -> None:
    assert wire.valid_file_prefix("")
    assert wire.valid_file_prefix("k3y~")


def test_unknown_formats_are_refused() -> None:
    with pytest.raises(ValueError):
        wire.compose_file_id("", "gif")


def test_generator_labels_carry_the_selector_of_their_component() -> None:
    labels = wire.generator_labels("sd35", wire.COMPONENT_POD)
    assert wire.pod_selector("sd35").items() <= labels.items()
    router = wire.generator_labels("sd35", wire.COMPONENT_ROUTER)
    assert not wire.pod_selector("sd35").items() <= router.items()
    assert labels[wire.LABEL_MANAGED_BY] == wire.MANAGED_BY


def test_selector_string_is_sorted_and_parseable() -> None:
    text = wire.selector_string({"b": "2", "a": "1"})
    assert text == "a=1,b=2"
    assert dict(part.split("=") for part in text.split(",")) == {"a": "1", "b": "2"}


def test_the_crd_file_names_the_group_version_and_kind_of_the_contract() -> None:
    crd = yaml.safe_load((REPO / "crds" / "imagegenerator.yaml").read_text())
    assert crd["metadata"]["name"] == wire.CRD_NAME
    spec = crd["spec"]
    assert spec["group"] == wire.GROUP
    assert spec["names"]["kind"] == wire.KIND
    assert spec["names"]["plural"] == wire.PLURAL
    assert spec["names"]["singular"] == wire.SINGULAR
    assert wire.SHORT_NAME in spec["names"]["shortNames"]
    assert [v["name"] for v in spec["versions"] if v["storage"]] == [wire.VERSION]
