"""paho's automatic reconnect as MqttClient configures it: exponential from a per-client random first wait (the
jitter), capped at 120 s. Drives paho's own `_reconnect_wait` on a fake clock, so this checks the waits paho will
really take, not just the numbers we pass it."""

from __future__ import annotations

import itertools
import types

import paho.mqtt.client as paho_client
import pytest

from agent.transport.mqtt import RECONNECT_MAX_DELAY_S, RECONNECT_MIN_DELAY_S, MqttClient


def paho_waits(client: MqttClient, attempts: int, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The waits paho's reconnect loop takes for `attempts` failed reconnects in a row (fake clock)."""
    now = [1000.0]

    def sleep(s: float) -> None:
        now[0] += s

    monkeypatch.setattr(paho_client, "time_func", lambda: now[0])
    monkeypatch.setattr(paho_client, "time", types.SimpleNamespace(sleep=sleep))
    p = client._new_paho("5")
    waits = []
    for _ in range(attempts):
        start = now[0]
        p._reconnect_wait()
        waits.append(now[0] - start)
    return waits


def test_backoff_is_exponential_capped_and_jittered_per_client(monkeypatch: pytest.MonkeyPatch) -> None:
    low, high = RECONNECT_MIN_DELAY_S
    assert RECONNECT_MAX_DELAY_S == 120.0
    firsts = []
    for i in range(20):
        client = MqttClient("mqtt://127.0.0.1:1", f"c{i}")
        waits = paho_waits(client, 12, monkeypatch)
        assert low <= waits[0] <= high
        assert waits[0] == pytest.approx(client.reconnect_min_delay)
        for a, b in itertools.pairwise(waits):
            assert b == pytest.approx(min(2 * a, RECONNECT_MAX_DELAY_S))
        assert waits[-1] == pytest.approx(RECONNECT_MAX_DELAY_S)  # 12 failures: long since at the cap
        assert max(waits) <= RECONNECT_MAX_DELAY_S + 1e-9
        firsts.append(waits[0])
    assert len(set(firsts)) == len(firsts)  # no two clients of a fleet retry in lockstep
