"""Every MQTT topic name edgeship uses, their validation, and the MQTT matching rule: pure, no I/O, no paho.

Names follow docs/transport.md under one prefix (`edgeship/<fleet>/`); they must mean the same on every broker we
support (Mosquitto, RabbitMQ's MQTT plugin, NATS, EMQX, HiveMQ), so a name we build never holds a wildcard, an
empty level, a leading `$`, or any of `.` (NATS 2.9 refuses it, RabbitMQ swaps it with `/` in retained topic
names), `*`, `>` or a space (NATS subject tokens). TUF's wire names (`timestamp.json`, `3.root.json`) therefore map
to topics without dots (`tuf_topic_suffix`), and every level built from user input (fleet, group, device id, client
id) follows one rule, `ID_PATTERN`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from agent.ids import CLIENT_ID_PATTERN, ID_PATTERN, ID_RULE, UNPORTABLE, check_id, is_client_id, is_id

__all__ = ["CLIENT_ID_PATTERN", "DEFAULT_PREFIX", "ID_PATTERN", "ID_RULE", "ROOT_LATEST", "Topics", "check_id",
           "check_portable", "is_client_id", "is_id", "matches", "tuf_filename", "tuf_topic_suffix", "validate_filter",
           "validate_topic"]

DEFAULT_PREFIX = "edgeship/default/"
_MAX_TOPIC_BYTES = 65535
_SHA256_RE = re.compile(r"[0-9a-f]{64}")

_ROLE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_VERSIONED_RE = re.compile(r"(0|[1-9][0-9]{0,18})\.([^.]+)\.json")
ROOT_LATEST = "latest"  # tuf/root/latest: the newest root again, so "is there a newer root?" needs no 404


def tuf_topic_suffix(filename: str) -> str:
    """TUF wire name -> topic below the prefix: `timestamp.json` -> `tuf/timestamp`, `<N>.<role>.json` ->
    `tuf/<role>/<N>`, `<role>.json` -> `tuf/<role>`. ValueError for anything else (a role outside `[A-Za-z0-9_-]`,
    a version that is not a decimal without leading zeros)."""
    m = _VERSIONED_RE.fullmatch(filename)
    if m:
        version, role = m.group(1), m.group(2)
    elif filename.endswith(".json"):
        version, role = None, filename[: -len(".json")]
    else:
        raise ValueError(f"not a TUF metadata file name: {filename!r}")
    if not _ROLE_RE.fullmatch(role) or role == ROOT_LATEST:
        raise ValueError(f"TUF role name {role!r} in {filename!r}: use letters, digits, '_' and '-'")
    return f"tuf/{role}" if version is None else f"tuf/{role}/{version}"


def tuf_filename(suffix: str) -> str:
    """The inverse of `tuf_topic_suffix`: `tuf/root/3` -> `3.root.json`, `tuf/timestamp` -> `timestamp.json`."""
    levels = suffix.split("/")
    if levels[0] != "tuf" or len(levels) not in (2, 3):
        raise ValueError(f"not a TUF metadata topic: {suffix!r}")
    name = f"{levels[1]}.json" if len(levels) == 2 else f"{levels[2]}.{levels[1]}.json"
    if tuf_topic_suffix(name) != suffix:
        raise ValueError(f"not a TUF metadata topic: {suffix!r}")
    return name


def check_portable(topic: str) -> str:
    """A topic name we build: valid (`validate_topic`) and meaning the same on every broker (module doc)."""
    validate_topic(topic)
    bad = sorted({c for c in topic if c in UNPORTABLE})
    if bad:
        raise ValueError(f"MQTT topic {topic!r} holds {''.join(bad)!r}, which NATS or RabbitMQ read differently")
    return topic


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


class Topics:
    """The topic names of docs/transport.md under one prefix (`edgeship/<fleet>/`)."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        prefix = prefix if prefix.endswith("/") else prefix + "/"
        check_portable(prefix[:-1])
        self.prefix = prefix

    def __repr__(self) -> str:
        return f"Topics({self.prefix!r})"

    def tuf(self, filename: str) -> str:
        """The topic of TUF metadata by its wire name (`tuf_topic_suffix`): `3.root.json` -> `<prefix>tuf/root/3`."""
        return self.prefix + tuf_topic_suffix(filename)

    @property
    def root_latest(self) -> str:
        """`tuf/root/latest`: the newest root's signed bytes again (docs/transport.md)."""
        return f"{self.prefix}tuf/root/{ROOT_LATEST}"

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
        if not is_client_id(client_id):
            raise ValueError(f"invalid client id for an MQTT topic level: {client_id!r}")
        return f"{self.prefix}_barrier/{client_id}"

    def device(self, device_id: str, leaf: str) -> str:
        """`devices/<id>/state`, `.../telemetry`, `.../events`, `.../infer/request` ..."""
        return check_portable(f"{self.prefix}devices/{check_id(device_id, 'device id')}/{leaf}")

    def rollout(self, group: str) -> str:
        """`rollouts/<group>`: the retained status of the group's rollout, for dashboards and `packager rollout`
        (the signed deployment documents stay TUF targets; this is only a report)."""
        return check_portable(f"{self.prefix}rollouts/{check_id(group, 'group')}")
