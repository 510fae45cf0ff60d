"""MQTT inference and feedback: answer `devices/<id>/infer/request[/<app>]` messages, on topics the request may
choose within the rules below, and take labels from `devices/<id>/feedback[/<app>]`.

API for the daemon (which subscribes and hands each `Message` over, on a worker thread):
- `MqttInference(holder, stats, publish, prefix, device_id, feedback=sink)`; `publish(topic, payload,
  correlation_data)` sends one answer; `feedback` is the FeedbackSink (None: feedback messages are ignored).
- `.answer(msg)`: one inference request. The answer carries the OIP `id` (the request's, or a generated one).
- `.feedback(msg)`: one feedback message, the same JSON as POST /v2/models/<name>/feedback (`{"id", "label"}`,
  optionally `"model_name"`, default the served model's name), at most MAX_FEEDBACK_BYTES. With an MQTT 5
  response topic (allowed by the rules below) the agent answers there `{"id", "result"}` or `{"error", "status"}`
  (400 malformed, 413 too large) with the request's correlation data; without one it answers nothing. A
  feedback message whose response topic is refused is not applied.
Neither method raises.

A request names its response topic (MQTT 5 Response Topic). The agent answers only where a client could not use it
to write into the fleet's own namespace (TUF metadata, targets, deployments, another device's topics):

- no response topic: `<prefix>devices/<id>/infer/response`;
- otherwise a topic name (no `+` or `#`, no NUL, not starting with `$`), valid UTF-8, at most
  MAX_RESPONSE_TOPIC_BYTES bytes, without empty levels (`/x`, `a//b`: valid MQTT, but not a name every broker we
  support takes, and paho refuses them on publish), and either outside the fleet prefix or this device's own
  `<prefix>devices/<id>/infer/response` or a topic under it.

An inference app with a broker identity of its own asks on its own topic, `<prefix>devices/<id>/infer/request/<app>`
(feedback: `.../feedback/<app>`), which the broker's ACL lets only that app write (packager/acl.py). Such a request
is answered only on `<prefix>devices/<id>/infer/response/<app>`: a response topic naming anything else is refused.
Otherwise app X could have the device publish an answer X chose the input of into app Y's response topic.

A refused topic gets no answer, an inference request is counted as rejected, and the reason is logged at WARNING
once per topic (again after REWARN_S). See docs/agent.md.
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
from agent.serve.holder import FeedbackSink, ModelHolder, RequestStats, release_memory
from agent.serve.oip import MAX_FEEDBACK_BYTES, TRIM_AFTER_BYTES, run_feedback, run_infer

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


def topic_app(topic: str, prefix: str, device_id: str, leaf: str) -> str | None:
    """The app a per-app topic `<prefix>devices/<id>/<leaf>/<app>` names; None for any other topic. Pure."""
    base = f"{prefix}devices/{device_id}/{leaf}/"
    return topic[len(base):] if topic.startswith(base) else None


def app_answer_refusal(topic: str, app: str, prefix: str, device_id: str) -> str | None:
    """Why a message on app `app`'s own topic is not answered on `topic` (None: it is). Pure."""
    own = f"{response_topic(prefix, device_id)}/{app}"
    if "/" in app or not app:
        return "follows a request topic that names no single app"
    if topic != own:
        return f"is not {own!r}, the only answer topic of app {app!r}'s requests"
    return response_topic_refusal(topic, prefix, device_id)


def answer_mqtt_request(holder: ModelHolder, stats: RequestStats, payload: bytes,
                        max_body: int = MAX_MESSAGE_BYTES) -> bytes:
    """The answer to an MQTT inference request (`devices/<id>/infer/request`): never raises.

    The payload is the HTTP infer body, optionally with `model_name` / `model_version` (default: the model being
    served). The answer is the HTTP response body, or `{"error": ..., "status": <the HTTP status>}`.
    """
    if len(payload) > max_body:
        stats.record_rejected(model=holder.get())
        log.warning("refused an MQTT inference request of %d bytes: over the limit of %d bytes", len(payload),
                    max_body)
        return error_answer(413, f"request of {len(payload)} bytes is over the limit of {max_body} bytes")
    try:
        return run_infer(holder, stats, bytes(payload))
    except ServingError as e:
        return error_answer(e.status, str(e))
    except Exception:
        log.exception("MQTT inference request failed")
        return error_answer(500, "internal server error (logged by the agent)")
    finally:
        if len(payload) >= TRIM_AFTER_BYTES:
            release_memory()


def answer_mqtt_feedback(sink: FeedbackSink, holder: ModelHolder, payload: bytes,
                         max_body: int = MAX_FEEDBACK_BYTES) -> bytes:
    """The answer to an MQTT feedback message (`devices/<id>/feedback`): `{"id", "result"}` or
    `{"error", "status"}`; never raises. Malformed or oversize feedback never reaches the sink."""
    if len(payload) > max_body:
        log.info("refused MQTT feedback of %d bytes: over the limit of %d bytes", len(payload), max_body)
        return error_answer(413, f"feedback of {len(payload)} bytes is over the limit of {max_body} bytes")
    try:
        return run_feedback(sink, bytes(payload), None, holder.get())
    except ServingError as e:
        log.info("refused MQTT feedback: %s", e)
        return error_answer(e.status, str(e))
    except Exception:
        log.exception("MQTT feedback failed")
        return error_answer(500, "internal server error (logged by the agent)")


def error_answer(status: int, message: str) -> bytes:
    """An MQTT error answer: the HTTP API's status and message."""
    return json.dumps({"error": message, "status": status}, separators=(",", ":")).encode()


class MqttInference:
    """Answers inference requests with the served model; `publish(topic, payload, correlation_data)` sends."""

    def __init__(self, holder: ModelHolder, stats: RequestStats, publish: Callable[[str, bytes, bytes | None], Any],
                 prefix: str, device_id: str, max_payload: int = MAX_MESSAGE_BYTES,
                 clock: Callable[[], float] = time.monotonic, feedback: FeedbackSink | None = None) -> None:
        self.holder = holder
        self.sink = feedback
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

    def _where(self, msg: Any, leaf: str, default: str | None) -> tuple[str | None, str | None]:
        """(the topic to answer `msg` on (None: none), why that topic is refused (None: it is not)); `default`: the
        shared topic's answer topic without a response topic (None: no answer; then an app's gets none either)."""
        app = topic_app(msg.topic, self.prefix, self.device_id, leaf)
        if app is not None:
            own = f"{response_topic(self.prefix, self.device_id)}/{app}"
            topic = msg.response_topic or (own if default is not None else None)
            return topic, None if topic is None else app_answer_refusal(topic, app, self.prefix, self.device_id)
        topic = msg.response_topic or default
        return topic, None if topic is None else response_topic_refusal(topic, self.prefix, self.device_id)

    def _answer(self, msg: Any) -> None:
        topic, reason = self._where(msg, "infer/request", response_topic(self.prefix, self.device_id))
        assert topic is not None
        if reason is not None:
            self.stats.record_rejected(model=self.holder.get())
            self._warn(topic, f"not answering an MQTT inference request: response topic {topic!r} {reason}")
            return
        body = answer_mqtt_request(self.holder, self.stats, msg.payload, self.max_payload)
        try:
            self._publish(topic, body, msg.correlation_data)
        except (EdgeshipError, ValueError) as e:
            log.warning("could not answer an inference request on %r: %s", topic, e)

    def feedback(self, msg: Any) -> None:
        """Take one feedback message (a `Message`; module doc); never raises: whatever goes wrong is logged."""
        try:
            self._feedback(msg)
        except Exception:
            log.exception("MQTT feedback on %s failed", getattr(msg, "topic", "?"))

    def _feedback(self, msg: Any) -> None:
        if self.sink is None:
            log.debug("ignoring MQTT feedback on %s: feedback is not enabled", msg.topic)
            return
        topic, reason = self._where(msg, "feedback", None)
        if topic is not None and reason is not None:  # refused as a whole, like an inference request: nothing applied
            self._warn(topic, f"not taking MQTT feedback: response topic {topic!r} {reason}")
            return
        body = answer_mqtt_feedback(self.sink, self.holder, msg.payload)
        if topic is None:
            return
        try:
            self._publish(topic, body, msg.correlation_data)
        except (EdgeshipError, ValueError) as e:
            log.warning("could not answer feedback on %r: %s", topic, e)

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
