"""Pure parts of the serving limits: allowed MQTT response topics, shapes read without decoding, [serve] max_batch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.config import parse_config
from agent.errors import BatchTooLarge, ConfigError
from agent.serve.mqtt import MAX_RESPONSE_TOPIC_BYTES, response_topic_refusal
from agent.serve.oip import PRECHECK_BYTES, declared_batches, parse_infer_request

PREFIX = "edgeship/lab/"
DEV = "dev-1"


@pytest.mark.parametrize(("topic", "allowed"), [
    ("apps/ui/replies", True),
    ("replies/" + "x" * (MAX_RESPONSE_TOPIC_BYTES - 8), True),
    (f"{PREFIX}devices/{DEV}/infer/response", True),
    (f"{PREFIX}devices/{DEV}/infer/response/req-7", True),
    ("edgeship/labs/x", True),  # another prefix that merely starts alike
    (f"{PREFIX}tuf/timestamp.json", False),
    (f"{PREFIX}targets/abc", False),
    (f"{PREFIX}deployments/default.json", False),
    (f"{PREFIX}notify", False),
    ("edgeship/lab", False),
    (f"{PREFIX}devices/dev-2/infer/response", False),
    (f"{PREFIX}devices/{DEV}/state", False),
    (f"{PREFIX}devices/{DEV}/infer/responses", False),
    ("/x", False),
    ("a//b", False),
    ("a/", False),
    ("a/+/b", False),
    ("a/#", False),
    ("$SYS/x", False),
    ("a\x00b", False),
    ("a\udcff", False),  # not valid UTF-8
    ("r/" + "x" * MAX_RESPONSE_TOPIC_BYTES, False),
])
def test_response_topic_policy(topic: str, allowed: bool) -> None:
    reason = response_topic_refusal(topic, PREFIX, DEV)
    assert (reason is None) == allowed, reason


def _body(rows: int, nested: bool = False) -> bytes:
    data = np.zeros((rows, 1, 8, 8)).tolist() if nested else [0] * (rows * 64)
    return json.dumps({"id": "a[1,2]", "inputs": [{"name": "x", "shape": [rows, 1, 8, 8], "datatype": "FP32",
                                                     "data": data}]}).encode()


@pytest.mark.parametrize("nested", [False, True])
def test_shapes_are_read_without_the_data(nested: bool) -> None:
    body = _body(500, nested)
    assert len(body) >= PRECHECK_BYTES
    assert declared_batches(body) == {"x": [500, 1, 8, 8]}
    with pytest.raises(BatchTooLarge, match="at most 64 rows"):
        parse_infer_request(body, max_batch=64, model_name="m")
    assert parse_infer_request(body, max_batch=500).inputs["x"].shape == (500, 1, 8, 8)
    assert declared_batches(b"[" * 100_000) is None
    assert declared_batches(b'{"inputs": 3}') is None


def test_serve_max_batch_config() -> None:
    base = {"agent": {"device_id": "d", "state_dir": "/tmp/s"}, "trust": {"root": "/tmp/root.json"}}
    assert parse_config(base, env={}).serve.max_batch == 0
    assert parse_config({**base, "serve": {"max_batch": 8}}, env={}).serve.max_batch == 8
    assert parse_config(base, env={"EDGESHIP_SERVE_MAX_BATCH": "16"}).serve.max_batch == 16
    with pytest.raises(ConfigError, match=r"\[serve\] max_batch"):
        parse_config({**base, "serve": {"max_batch": -1}}, env={})
