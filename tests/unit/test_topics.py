"""MQTT topic names, topic/filter validation and matching, and the metadata publish order: pure, no broker."""

from __future__ import annotations

import pytest

from agent.transport.topics import Topics, matches, validate_filter, validate_topic
from packager.mqtt_publish import metadata_order


def test_topic_names_and_matching() -> None:
    t = Topics("edgeship/fleet1")
    assert t.tuf("3.root.json") == "edgeship/fleet1/tuf/3.root.json"
    assert t.chunk("a" * 64, 7) == f"edgeship/fleet1/targets/{'a' * 64}/7"
    assert t.barrier("dev-1") == "edgeship/fleet1/_barrier/dev-1"
    for bad in ("a/+/b", "a/#", "a//b", "/a", "a/", "", "$SYS/x"):
        with pytest.raises(ValueError):
            validate_topic(bad)
    for bad_name in ("x/y", "", "+"):
        with pytest.raises(ValueError):
            t.tuf(bad_name)
    with pytest.raises(ValueError):
        t.chunk("A" * 64, 0)
    with pytest.raises(ValueError):
        validate_filter("a/b#")
    assert matches("a/+/c", "a/b/c") and not matches("a/+/c", "a/b/d")
    assert matches("a/#", "a") and matches("a/#", "a/b/c") and matches("#", "x/y")
    assert not matches("+/x", "$SYS/x") and not matches("a/+", "a/b/c") and not matches("a/b", "a/b/c")


def test_metadata_publish_order() -> None:
    assert metadata_order(["timestamp.json", "2.snapshot.json", "10.root.json", "2.root.json", "3.targets.json"]) == [
        "2.root.json", "10.root.json", "3.targets.json", "2.snapshot.json", "timestamp.json",
    ]
