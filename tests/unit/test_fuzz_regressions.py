"""Inputs the fuzz harnesses (tests/fuzz/) found that raised an untyped exception or were wrongly accepted, each
checked for its typed refusal. The crashing inputs themselves are kept in tests/fuzz/corpus/<harness>/crash-* and
replayed by tests/unit/test_fuzz_corpus.py."""

from __future__ import annotations

import json
import tomllib

import pytest

from agent.config import parse_config
from agent.errors import BadRequest, ConfigError
from agent.serve.oip import parse_infer_request

_REQUIRED = '[agent]\ndevice_id = "d"\nstate_dir = "s"\n[trust]\nroot = "r"\n'


@pytest.mark.parametrize(("toml", "message"), [
    ("agent = 1\n", r"\[agent\] must be a table, got int"),  # was TypeError: 'int' object is not iterable
    ('mqtt = "x"\n' + _REQUIRED, r"\[mqtt\] must be a table, got str"),
    (_REQUIRED + '[mirror]\nhttp = "http://[::1"\n', r"\[mirror\] http .*expected an http"),  # was ValueError
    (_REQUIRED + "[serve]\nmax_batch = inf\n", r"\[serve\] max_batch: cannot convert float infinity"),  # Overflow
    (_REQUIRED + "[mqtt]\nconnect_timeout_s = 1" + "0" * 400 + "\n", r"\[mqtt\] connect_timeout_s: int too large"),
])
def test_config_fuzz_findings_are_config_errors(toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(tomllib.loads(toml), env={})


@pytest.mark.parametrize("data", [[70000], [1, -65520]])
def test_integers_that_overflow_fp16_are_refused(data: list[int]) -> None:
    # were accepted as inf: only float data was checked for overflow
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP16", "shape": [len(data)], "data": data}]})
    with pytest.raises(BadRequest, match="values overflow FP16"):
        parse_infer_request(body.encode())


def test_integers_that_fit_fp16_are_taken() -> None:
    body = json.dumps({"inputs": [{"name": "x", "datatype": "FP16", "shape": [2], "data": [65504, -3]}]})
    assert parse_infer_request(body.encode()).inputs["x"].tolist() == [65504.0, -3.0]
