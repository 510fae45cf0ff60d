"""agent/serve/mqtt.py: a message on an app's own topic (`infer/request/<app>`, `feedback/<app>`) is answered only on
that app's response topic, so no app can have the device answer into another's; the shared topics keep their rules.
MqttInference is fed `Message`s and publishes into a list (the broker's part: tests/integration)."""

from __future__ import annotations

from typing import Any

from agent.serve.holder import ModelHolder, RequestStats
from agent.serve.mqtt import MqttInference, app_answer_refusal, topic_app
from agent.transport.mqtt import Message

P = "edgeship/f1/"
DEV = "dev-a"
BASE = f"{P}devices/{DEV}/"


class Sink:
    def __init__(self) -> None:
        self.labels: list[tuple[str, str, Any]] = []

    def feedback(self, model_name: str, request_id: str, label: Any) -> str:
        self.labels.append((model_name, request_id, label))
        return "accepted"


def _inference() -> tuple[MqttInference, list[tuple[str, bytes, bytes | None]], Sink, RequestStats]:
    sent: list[tuple[str, bytes, bytes | None]] = []
    stats, sink = RequestStats(), Sink()
    answerer = MqttInference(ModelHolder(stats=stats), stats, lambda t, b, c: sent.append((t, b, c)), P, DEV,
                             feedback=sink)
    return answerer, sent, sink, stats


def test_the_app_is_the_level_after_the_shared_topic() -> None:
    assert topic_app(BASE + "infer/request/cam", P, DEV, "infer/request") == "cam"
    assert topic_app(BASE + "infer/request", P, DEV, "infer/request") is None
    assert topic_app(f"{P}devices/dev-b/infer/request/cam", P, DEV, "infer/request") is None
    assert app_answer_refusal(BASE + "infer/response/cam", "cam", P, DEV) is None
    assert "the only answer topic of app 'cam'" in str(app_answer_refusal(BASE + "infer/response/door", "cam", P, DEV))
    assert app_answer_refusal(BASE + "infer/response/", "", P, DEV) == \
        "follows a request topic that names no single app"


def test_an_apps_request_is_answered_on_its_own_response_topic_only() -> None:
    answerer, sent, _, stats = _inference()
    for asked in (BASE + "infer/response/door", BASE + "infer/response", "apps/door/replies"):
        answerer.answer(Message(BASE + "infer/request/cam", b"{}", False, asked, b"forged"))
    assert sent == [] and stats.snapshot()["rejected"] == 3
    answerer.answer(Message(BASE + "infer/request/cam", b"{}", False, None, b"mine"))
    answerer.answer(Message(BASE + "infer/request/cam", b"{}", False, BASE + "infer/response/cam", b"mine too"))
    assert [(t, c) for t, _, c in sent] == [(BASE + "infer/response/cam", b"mine"),
                                            (BASE + "infer/response/cam", b"mine too")]
    # the shared topic keeps its rules (a broker without ACLs): answered under the device's own response topic
    answerer.answer(Message(BASE + "infer/request", b"{}", False, BASE + "infer/response/door", b"shared"))
    assert sent[-1][0] == BASE + "infer/response/door"


def test_an_apps_feedback_answered_elsewhere_is_not_applied() -> None:
    answerer, sent, sink, _ = _inference()
    body = b'{"id": "r1", "label": 3, "model_name": "m"}'
    answerer.feedback(Message(BASE + "feedback/cam", body, False, BASE + "infer/response/door", b"forged"))
    assert sink.labels == [] and sent == []
    answerer.feedback(Message(BASE + "feedback/cam", body, False, None, None))  # no response topic: no answer
    answerer.feedback(Message(BASE + "feedback/cam", body, False, BASE + "infer/response/cam", b"c"))
    assert sink.labels == [("m", "r1", 3)] * 2
    assert [(t, c) for t, _, c in sent] == [(BASE + "infer/response/cam", b"c")]
