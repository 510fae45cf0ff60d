"""Every MQTT topic name edgeship uses, their validation, and the MQTT matching rule: pure, no I/O, no paho.

Names follow docs/transport.md under one prefix (`edgeship/<fleet>/`); they must mean the same on every broker we
support, so a topic name never holds a wildcard, an empty level or a leading `$`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

DEFAULT_PREFIX = "edgeship/default/"
_MAX_TOPIC_BYTES = 65535
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def _check_common(text: str, kind: str) -> None:
    if not text:
        raise ValueError(f"empty MQTT {kind}")
    if "\x00" in text:
        raise ValueError(f"MQTT {kind} contains NUL: {text!r}")
    if len(text.encode("utf-8")) > _MAX_TOPIC_BYTES:
        raise ValueError(f"MQTT {kind} longer than {_MAX_TOPIC_BYTES} bytes")


def validate_topic(topic: str) -> str:
    """A topic name we publish or read: no wildcards, no empty levels, not a `$` system topic."""
    _check_common(topic, "topic")
    if "+" in topic or "#" in topic:
        raise ValueError(f"wildcard in MQTT topic name: {topic!r}")
    if "" in topic.split("/"):
        raise ValueError(f"empty level in MQTT topic name: {topic!r}")
    if topic.startswith("$"):
        raise ValueError(f"MQTT topic name starts with '$': {topic!r}")
    return topic


def validate_filter(topic_filter: str) -> str:
    """A subscription filter: `+` fills a whole level, `#` only as the whole last level."""
    _check_common(topic_filter, "topic filter")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"'#' must be the whole last level: {topic_filter!r}")
        if "+" in level and level != "+":
            raise ValueError(f"'+' must be a whole level: {topic_filter!r}")
    return topic_filter


def matches(topic_filter: str, topic: str) -> bool:
    """Whether `topic` matches `topic_filter` under MQTT rules (wildcards never match a leading `$` level)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True  # also matches the parent: "a/#" matches "a"
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)


def _check_sha256(sha256: str) -> str:
    if not _SHA256_RE.fullmatch(sha256):
        raise ValueError(f"not a lowercase hex sha256: {sha256!r}")
    return sha256


def _check_level(value: str, what: str) -> str:
    if not value or "/" in value or "+" in value or "#" in value or "\x00" in value:
        raise ValueError(f"invalid {what} for an MQTT topic level: {value!r}")
    return value


class Topics:
    """The topic names of docs/transport.md under one prefix (`edgeship/<fleet>/`)."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        prefix = prefix if prefix.endswith("/") else prefix + "/"
        validate_topic(prefix[:-1])
        self.prefix = prefix

    def __repr__(self) -> str:
        return f"Topics({self.prefix!r})"

    def tuf(self, filename: str) -> str:
        return self.prefix + "tuf/" + _check_level(filename, "metadata file name")

    def target_meta(self, sha256: str) -> str:
        return f"{self.prefix}targets/{_check_sha256(sha256)}/meta"

    def chunk(self, sha256: str, index: int) -> str:
        if index < 0:
            raise ValueError(f"negative chunk index {index}")
        return f"{self.prefix}targets/{_check_sha256(sha256)}/{index}"

    def chunks(self, sha256: str, indices: Iterable[int]) -> list[str]:
        return [self.chunk(sha256, i) for i in indices]

    @property
    def notify(self) -> str:
        return self.prefix + "notify"

    def barrier(self, client_id: str) -> str:
        return f"{self.prefix}_barrier/{_check_level(client_id, 'client id')}"

    def device(self, device_id: str, leaf: str) -> str:
        """`devices/<id>/state`, `.../telemetry`, `.../events`, `.../infer/request` ..."""
        return validate_topic(f"{self.prefix}devices/{_check_level(device_id, 'device id')}/{leaf}")

    def rollout(self, group: str) -> str:
        """`rollouts/<group>`: the retained status of the group's rollout, for dashboards and `packager rollout`
        (the signed deployment documents stay TUF targets; this is only a report)."""
        return validate_topic(f"{self.prefix}rollouts/{_check_level(group, 'group')}")
