"""`packager fleet status` on a broker that hands retained messages to exact subscriptions only (RabbitMQ 3.10): a
device known by its telemetry has its state read on the exact topic. A fake client stands in for the broker: what
is under test is which topics the command reads, not a broker."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from agent.transport.mqtt import Message
from packager.fleet.status import collect
from packager.fleet.view import FleetView
from tests.unit.test_fleet_view import P, state, telemetry, topic


class _WildcardWithoutRetained:
    """Live messages through the wildcard, retained ones only on exact reads (RabbitMQ's behaviour)."""

    def __init__(self, live: list[Message], retained: dict[str, bytes]) -> None:
        self.live, self.retained = live, retained
        self.exact_reads: list[list[str]] = []

    def subscribe_stream(self, filters: list[str], timeout: float = 10.0) -> _Stream:
        return _Stream(filters, iter(self.live))

    def get_retained(self, topics: list[str], timeout: float = 10.0) -> dict[str, bytes]:
        self.exact_reads.append(list(topics))
        return {t: self.retained[t] for t in topics if t in self.retained}


class _Stream:
    def __init__(self, filters: list[str], messages: Iterator[Message]) -> None:
        self.filters, self._messages = filters, messages

    def get(self, timeout: float | None = None) -> Message | None:
        return next(self._messages, None)

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def test_a_device_seen_by_telemetry_gets_its_state_from_the_exact_topic() -> None:
    live = [Message(topic("d1", "telemetry"), telemetry("d1", 1), False),
            Message(topic("d1", "telemetry"), telemetry("d1", 2), False),
            Message(topic("d2", "telemetry"), telemetry("d2", 1), False)]
    client = _WildcardWithoutRetained(live, {topic("d1", "state"): state("d1")})
    view = FleetView(P)
    ticks = iter(range(100_000))
    collect(client, view, wait=100, clock=lambda: next(ticks) / 1000)  # type: ignore[arg-type]  # fake clock
    assert view.rows["d1"].online is True and view.rows["d1"].group == "lab"
    assert view.rows["d2"].online is None  # no retained state anywhere: still unknown, never "offline"
    assert client.exact_reads == [[topic("d1", "state")], [topic("d2", "state")]]  # each device read once
