"""Replays every fuzz corpus file (tests/fuzz/corpus/<harness>/: seeds, the fuzzer's finds and the crash-*
regressions) through its harness's `test_one_input`, without atheris: a harness raises only on a real defect (an
untyped exception from the agent, or an input accepted that breaks the harness's invariants), so any exception here
fails the test and names the file."""

from __future__ import annotations

import importlib
import traceback
from dataclasses import replace
from pathlib import Path

import pytest

from agent.config import parse_config
from tests.fuzz.common import Accepted
from tests.fuzz.fuzz_config import check_config
from tests.fuzz.runner import CORPUS, HARNESSES


@pytest.mark.parametrize("name", HARNESSES)
def test_corpus_replays_clean(name: str) -> None:
    harness = importlib.import_module(f"tests.fuzz.fuzz_{name}")
    files = sorted(p for p in (CORPUS / name).iterdir() if p.is_file())
    assert any(p.name.startswith("seed-") for p in files), f"no seeds in {CORPUS / name}: run make_corpus"
    failures = []
    for path in files:
        try:
            harness.test_one_input(path.read_bytes())
        except Exception:
            failures.append(f"{path.name}:\n{traceback.format_exc(limit=-3)}")
    assert not failures, f"{len(failures)} of {len(files)} {name} corpus inputs fail:\n" + "\n".join(failures[:5])


@pytest.mark.parametrize(("url", "mqtt"), [
    ("mqtts://b:8883", {"cert_file": "/c.pem", "ca_file": "/ca.pem"}),
    ("mqtts://b:8883", {"key_file": "/k.pem"}),
    ("mqtt://b:1883", {"cert_file": "/c.pem", "key_file": "/k.pem", "ca_file": "/ca.pem"}),
    ("mqtts://b:8883", {"cert_file": "/c.pem", "key_file": "/k.pem"}),
])
def test_the_config_harness_catches_a_client_certificate_config_the_agent_must_refuse(url: str,
                                                                                    mqtt: dict[str, str]) -> None:
    cfg = parse_config({"agent": {"device_id": "d", "state_dir": "/s"}, "trust": {"root": "/r.json"},
                        "mqtt": {"url": url}}, {}, base_dir=Path("/"))
    check_config(cfg)
    with pytest.raises(Accepted):
        check_config(replace(cfg, mqtt=replace(cfg.mqtt, **mqtt)))
