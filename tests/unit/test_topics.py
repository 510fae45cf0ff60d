"""MQTT topic names, topic/filter validation and matching, and the metadata publish order: pure, no broker."""

from __future__ import annotations

import pytest

from agent.transport.topics import (
    Topics,
    check_id,
    check_portable,
    is_id,
    matches,
    tuf_filename,
    tuf_topic_suffix,
    validate_filter,
    validate_topic,
)
from packager.mqtt_publish import metadata_order


def test_topic_names_and_matching() -> None:
    t = Topics("edgeship/fleet1")
    assert t.tuf("3.root.json") == "edgeship/fleet1/tuf/root/3"
    assert t.root_latest == "edgeship/fleet1/tuf/root/latest"
    assert t.chunk("a" * 64, 7) == f"edgeship/fleet1/targets/{'a' * 64}/7"
    assert t.barrier("dev-1") == "edgeship/fleet1/_barrier/dev-1"
    for bad in ("a/+/b", "a/#", "a//b", "/a", "a/", "", "$SYS/x"):
        with pytest.raises(ValueError):
            validate_topic(bad)
    for bad_name in ("x/y", "", "+", "3.root", "timestamp", "03.root.json", "1.a.b.json",
                     "a b.json", "latest.json", "3.latest.json", "x/y.json", "+.json", "3.root*.json"):
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


@pytest.mark.parametrize(("name", "suffix"), [
    ("timestamp.json", "tuf/timestamp"),
    ("snapshot.json", "tuf/snapshot"),
    ("root.json", "tuf/root"),
    ("1.root.json", "tuf/root/1"),
    ("12.snapshot.json", "tuf/snapshot/12"),
    ("7.targets.json", "tuf/targets/7"),
    ("3.role_a-1.json", "tuf/role_a-1/3"),
])
def test_tuf_wire_names_map_to_dotless_topics_and_back(name: str, suffix: str) -> None:
    assert tuf_topic_suffix(name) == suffix
    assert tuf_filename(suffix) == name
    assert "." not in Topics("edgeship/f").tuf(name)


def test_tuf_topic_inverse_refuses_other_topics() -> None:
    for bad in ("tuf", "tuf/root/latest", "tuf/root/03", "tuf/root/1/2", "targets/root/1", "tuf/a.b", "tuf/root/x"):
        with pytest.raises(ValueError):
            tuf_filename(bad)


def test_one_id_rule_for_every_level_from_user_input() -> None:
    for good in ("pi-0042", "a", "A_b-9", "x" * 64):
        assert is_id(good) and check_id(good, "device id") == good
    for bad in ("", ".", "a.b", "-a", "_a", "a b", "a/b", "a+b", "a#", "a*", "a>b", "x" * 65, "ä", "$a"):
        assert not is_id(bad)
        with pytest.raises(ValueError, match="device id"):
            check_id(bad, "device id")
    t = Topics("edgeship/f")
    assert t.device("pi-1", "state") == "edgeship/f/devices/pi-1/state"
    assert t.rollout("canary") == "edgeship/f/rollouts/canary"
    for bad in ("a.b", "a b", "+", "a*"):
        with pytest.raises(ValueError):
            t.device(bad, "state")
        with pytest.raises(ValueError):
            t.rollout(bad)
    with pytest.raises(ValueError):
        t.barrier("client.1")  # a client id is a barrier topic level: the same characters
    for bad_prefix in ("edgeship/f.1", "edge ship", "a/*", "a/>", "$x", "a//b"):
        with pytest.raises(ValueError):
            Topics(bad_prefix)


def test_portable_names() -> None:
    assert check_portable("edgeship/f/tuf/root/3") == "edgeship/f/tuf/root/3"
    for bad in ("a/b.c", "a/*", "a/>", "a b", "a/+", "$SYS/x"):
        with pytest.raises(ValueError):
            check_portable(bad)
