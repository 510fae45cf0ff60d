"""The one rule for a name that becomes an MQTT topic level: fleet, group and device names, client ids. Pure.

Kept apart from `agent.transport.topics` (which re-exports it) so that agent/config.py can check names without
importing the transport package (the deploy side, which reads the config, must not: pyproject's contracts).

No `.`: NATS 2.9 refuses it in MQTT topics and RabbitMQ swaps it with `/` in retained topic names; no `*`, `>` or
spaces (NATS subject tokens). A group name is also a file name (`deployments/<group>.json`).
"""

from __future__ import annotations

import re

ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
ID_RULE = "letters, digits, '_' and '-', starting with a letter or digit, at most 64"
_ID_RE = re.compile(ID_PATTERN)
# An MQTT client id we use: a level of our barrier topic, so the same characters, up to 128 (every broker we
# support takes that; MQTT 3.1.1 promises only 23)
CLIENT_ID_PATTERN = r"[A-Za-z0-9_-]{1,128}"
_CLIENT_ID_RE = re.compile(CLIENT_ID_PATTERN)
# Characters legal in an MQTT topic name that another broker reads differently (besides the wildcards `+` `#`)
UNPORTABLE = ".*> "


def is_id(value: object) -> bool:
    """Whether `value` is a string that follows the ID rule (`ID_PATTERN`)."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def check_id(value: str, what: str) -> str:
    """`value` if it follows the ID rule, else ValueError naming `what` (callers turn it into their own error)."""
    if not is_id(value):
        raise ValueError(f"{what} {value!r}: use {ID_RULE}")
    return value


def is_client_id(value: object) -> bool:
    return isinstance(value, str) and _CLIENT_ID_RE.fullmatch(value) is not None
