"""Fuzz MQTT inference and feedback: the payload of `devices/<id>/infer/request` or `devices/<id>/feedback`.

Byte 0 picks the handler (even: inference, odd: feedback), the rest is the payload. Both handlers never raise and
always answer a JSON object: an OIP response, a feedback result, or `{"error", "status"}` with a 4xx/503 status. A
500 "internal server error" answer means an unexpected exception inside the agent: a defect. An inference answer
comes from the served model (tests/fuzz/served.py), whose session checks every tensor it is fed against the model
and the preprocessing budget.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from agent.serve.mqtt import answer_mqtt_feedback, answer_mqtt_request
from agent.serve.oip import FEEDBACK_RESULTS
from tests.fuzz.common import check
from tests.fuzz.served import MANIFEST, holder

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


_SINK = Sink()


def test_one_input(data: bytes) -> None:
    if not data:
        return
    payload = data[1:]
    feedback = bool(data[0] & 1)
    if feedback:
        answer = answer_mqtt_feedback(_SINK, _HOLDER, payload)
    else:
        answer = answer_mqtt_request(_HOLDER, _STATS, payload)
    doc = json.loads(answer)
    check(isinstance(doc, dict), f"answer {answer[:200]!r}")
    if "error" in doc:
        check(doc.get("status") in (400, 404, 413, 503), f"answer {answer[:300]!r}")
    elif feedback:
        check(doc.get("result") in FEEDBACK_RESULTS, f"answer {answer[:200]!r}")
    else:
        check(isinstance(doc.get("outputs"), list) and doc.get("model_name") == MANIFEST.name, f"{answer[:200]!r}")


def main() -> None:
    from tests.fuzz.runner import fuzz

    fuzz("oip_mqtt", sys.argv)


if __name__ == "__main__":
    main()
