"""Fuzz MQTT inference and feedback (agent.serve.mqtt.MqttInference): one message on `devices/<id>/infer/request`
or `devices/<id>/feedback`, with its MQTT 5 response topic and correlation data.

Input: byte 0 is flags (bit 0: feedback, else inference; bit 1: the message has a response topic: byte 1 is its
length n, the next n bytes its UTF-8, undecodable bytes kept as lone surrogates); the rest is the payload, whose
first 8 bytes are also the correlation data. The daemon's worker calls `answer`/`feedback`, which log and swallow
any exception; the harness calls what they wrap (`_answer`, `_feedback`) so an exception is seen.

Invariants: an answer is published only on a topic the module's rules allow (no wildcard, NUL, `$` start or empty
level, at most 256 bytes, outside the fleet prefix or this device's own response topic or under it), with the
request's correlation data; an inference request is answered exactly once when its topic is allowed (never when
refused); every answer is a JSON object: an OIP response, a feedback result, or `{"error", "status"}` with a
4xx/503 status. A 500 "internal server error" answer means an unexpected exception inside the agent: a defect.
An inference answer comes from the served model (tests/fuzz/served.py), whose session checks every tensor it is
fed against the model and the preprocessing budget.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from agent.serve.mqtt import MAX_RESPONSE_TOPIC_BYTES, MqttInference, response_topic
from agent.serve.oip import FEEDBACK_RESULTS
from tests.fuzz.common import check
from tests.fuzz.served import MANIFEST, holder

PREFIX = "edgeship/lab/"
DEVICE = "cam-7"
_HOLDER, _STATS = holder()


class Sink:
    """A FeedbackSink that knows one answer id ("req-1": 4 classes) and checks what it is handed."""

    def feedback(self, model_name: str, request_id: str, label: Any) -> str:
        check(isinstance(request_id, str) and request_id != "", f"feedback id {request_id!r}")
        check(isinstance(model_name, str), f"feedback model {model_name!r}")
        if request_id != "req-1":
            return "unknown"
        if isinstance(label, list):
            if len(label) != 4:
                raise ValueError("expected 4 values")
            return "accepted"
        if not isinstance(label, int) or not 0 <= label < 4:
            raise ValueError("expected a class index")
        return "accepted"


@dataclass
class Message:
    topic: str
    payload: bytes
    response_topic: str | None
    correlation_data: bytes | None


_SENT: list[tuple[str, bytes, bytes | None]] = []
_INFERENCE = MqttInference(_HOLDER, _STATS, lambda t, b, c: _SENT.append((t, b, c)), PREFIX, DEVICE,
                           feedback=Sink())


def allowed(topic: str) -> bool:
    own = response_topic(PREFIX, DEVICE)
    levels = topic.split("/")
    return (0 < len(topic.encode("utf-8", "surrogatepass")) <= MAX_RESPONSE_TOPIC_BYTES
            and not any(c in topic for c in "+#\0") and not topic.startswith("$") and "" not in levels
            and (topic == own or topic.startswith(own + "/")
                 or not (topic.startswith(PREFIX) or topic == PREFIX.rstrip("/"))))


def test_one_input(data: bytes) -> None:
    if not data:
        return
    flags, rest = data[0], data[1:]
    topic: str | None = None
    if flags & 2 and rest:
        n = rest[0]
        topic = rest[1:1 + n].decode("utf-8", "surrogateescape")
        rest = rest[1 + n:]
    feedback = bool(flags & 1)
    correlation = rest[:8] or None
    msg = Message(f"{PREFIX}devices/{DEVICE}/" + ("feedback" if feedback else "infer/request"), rest, topic,
                  correlation)
    _SENT.clear()
    if feedback:
        _INFERENCE._feedback(msg)
    else:
        _INFERENCE._answer(msg)
    # an inference request without a response topic (or an empty one, not a topic name) is answered on the device's
    # own; feedback without one is not answered
    target = topic if feedback else (topic or response_topic(PREFIX, DEVICE))
    if target is None or not _valid_utf8(target) or not allowed(target):
        check(not _SENT, f"answered on {target!r}, a topic the rules refuse")
        return
    check(len(_SENT) == 1, f"{len(_SENT)} answers to one message")
    sent_topic, answer, sent_correlation = _SENT[0]
    check(sent_topic == target and sent_correlation == correlation, "answered on another topic or correlation")
    doc = json.loads(answer)
    check(isinstance(doc, dict), f"answer {answer[:200]!r}")
    if "error" in doc:
        check(doc.get("status") in (400, 404, 413, 503), f"answer {answer[:300]!r}")
    elif feedback:
        check(doc.get("result") in FEEDBACK_RESULTS, f"answer {answer[:200]!r}")
    else:
        check(isinstance(doc.get("outputs"), list) and doc.get("model_name") == MANIFEST.name, f"{answer[:200]!r}")


def _valid_utf8(topic: str) -> bool:
    try:
        topic.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def main() -> None:
    from tests.fuzz.runner import fuzz

    fuzz("oip_mqtt", sys.argv)


if __name__ == "__main__":
    main()
