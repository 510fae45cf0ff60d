"""MQTT inference: answer `devices/<id>/infer/request` messages, on topics the request may choose.

A request names its response topic (MQTT 5 Response Topic). The agent answers only where a client could not use it
to write into the fleet's own namespace (TUF metadata, targets, deployments, another device's topics):

- no response topic: `<prefix>devices/<id>/infer/response`;
- otherwise a topic name (no `+` or `#`, no NUL, not starting with `$`), valid UTF-8, at most
  MAX_RESPONSE_TOPIC_BYTES bytes, without empty levels (`/x`, `a//b`: valid MQTT, but not a name every broker we
  support takes, and paho refuses them on publish), and either outside the fleet prefix or this device's own
  `<prefix>devices/<id>/infer/response` or a topic under it.

A refused topic gets no answer, the request is counted as rejected, and the reason is logged at WARNING once per
topic (again after REWARN_S). See docs/agent.md.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from agent.errors import EdgeshipError, ServingError
from agent.limits import MAX_MESSAGE_BYTES
from agent.serve.holder import ModelHolder, RequestStats, release_memory
from agent.serve.oip import TRIM_AFTER_BYTES, run_infer

log = logging.getLogger(__name__)

MAX_RESPONSE_TOPIC_BYTES = 256
REWARN_S = 600.0  # a refused topic is logged again after this long
_WARNED_TOPICS = 256  # topics remembered for the once-per-topic warning


def response_topic(prefix: str, device_id: str) -> str:
    """This device's default response topic."""
    return f"{prefix}devices/{device_id}/infer/response"


def response_topic_refusal(topic: str, prefix: str, device_id: str) -> str | None:
    """Why the agent will not answer on `topic` (None: it will). Pure."""
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if not topic:
        return "empty"
    if size > MAX_RESPONSE_TOPIC_BYTES:
        return f"longer than {MAX_RESPONSE_TOPIC_BYTES} bytes"
    if "\x00" in topic:
        return "contains NUL"
    if "+" in topic or "#" in topic:
        return "contains a wildcard"
    if topic.startswith("$"):
        return "starts with '$' (broker system topics)"
    if "" in topic.split("/"):
        return "has an empty level"
    own = response_topic(prefix, device_id)
    if topic == own or topic.startswith(own + "/"):
        return None
    if topic.startswith(prefix) or topic == prefix.rstrip("/"):
        return f"inside the fleet's namespace {prefix!r} (only {own!r} and topics under it are answered there)"
    return None


def answer_mqtt_request(holder: ModelHolder, stats: RequestStats, payload: bytes,
                        max_body: int = MAX_MESSAGE_BYTES) -> bytes:
    """The answer to an MQTT inference request (`devices/<id>/infer/request`): never raises.

    The payload is the HTTP infer body, optionally with `model_name` / `model_version` (default: the model being
    served). The answer is the HTTP response body, or `{"error": ..., "status": <the HTTP status>}`.
    """
    def error(status: int, message: str) -> bytes:
        return json.dumps({"error": message, "status": status}, separators=(",", ":")).encode()

    if len(payload) > max_body:
        stats.record_rejected()
        log.warning("refused an MQTT inference request of %d bytes: over the limit of %d bytes", len(payload),
                    max_body)
        return error(413, f"request of {len(payload)} bytes is over the limit of {max_body} bytes")
    try:
        return run_infer(holder, stats, bytes(payload))
    except ServingError as e:
        return error(e.status, str(e))
    except Exception:
        log.exception("MQTT inference request failed")
        return error(500, "internal server error (logged by the agent)")
    finally:
        if len(payload) >= TRIM_AFTER_BYTES:
            release_memory()


class MqttInference:
    """Answers inference requests with the served model; `publish(topic, payload, correlation_data)` sends."""

    def __init__(self, holder: ModelHolder, stats: RequestStats, publish: Callable[[str, bytes, bytes | None], Any],
                 prefix: str, device_id: str, max_payload: int = MAX_MESSAGE_BYTES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.holder = holder
        self.stats = stats
        self._publish = publish
        self.prefix = prefix
        self.device_id = device_id
        self.max_payload = max_payload
        self._clock = clock
        self._warned: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def answer(self, msg: Any) -> None:
        """Answer one request (a `Message`); never raises: whatever goes wrong is logged."""
        try:
            self._answer(msg)
        except Exception:  # this runs in a worker thread: an exception here would vanish unlogged
            log.exception("MQTT inference request on %s failed", getattr(msg, "topic", "?"))

    def _answer(self, msg: Any) -> None:
        topic = msg.response_topic or response_topic(self.prefix, self.device_id)
        reason = response_topic_refusal(topic, self.prefix, self.device_id)
        if reason is not None:
            self.stats.record_rejected()
            self._warn(topic, f"not answering an MQTT inference request: response topic {topic!r} {reason}")
            return
        body = answer_mqtt_request(self.holder, self.stats, msg.payload, self.max_payload)
        try:
            self._publish(topic, body, msg.correlation_data)
        except (EdgeshipError, ValueError) as e:
            log.warning("could not answer an inference request on %r: %s", topic, e)

    def _warn(self, topic: str, message: str) -> None:
        now = self._clock()
        with self._lock:
            last = self._warned.get(topic)
            if last is not None and now - last < REWARN_S:
                return
            self._warned[topic] = now
            self._warned.move_to_end(topic)
            while len(self._warned) > _WARNED_TOPICS:
                self._warned.popitem(last=False)
        log.warning("%s", message)
