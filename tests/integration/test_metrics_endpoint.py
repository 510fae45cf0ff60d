"""GET /metrics on the real HTTP server: Prometheus text from the callable the daemon passes, built here with a real
prometheus_client registry; 404 without one; the callable's failure is a logged 500, never a dead server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.serve.holder import ModelHolder, RequestStats
from agent.serve.http import InferenceServer

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def client() -> Iterator[requests.Session]:
    s = requests.Session()
    s.trust_env = False
    yield s
    s.close()


def _server(metrics: object = None) -> InferenceServer:
    stats = RequestStats()
    return InferenceServer(ModelHolder(stats=stats), stats, "127.0.0.1", 0, timeout=2.0,
                           metrics=metrics)  # type: ignore[arg-type]


def test_metrics_are_the_callables_prometheus_text(registry: CollectorRegistry, client: requests.Session) -> None:
    requests_total = Counter("edgeship_inference_requests", "Inference requests", ["version"], registry=registry)
    latency = Histogram("edgeship_inference_latency_ms", "Latency", buckets=(1, 10, 100), registry=registry)
    requests_total.labels(version="3").inc(5)
    latency.observe(7.0)
    with _server(lambda: generate_latest(registry)) as server:
        r = client.get(f"{server.url}/metrics", timeout=10)
        assert r.status_code == 200
        assert r.headers["Content-Type"] == PROMETHEUS_TEXT
        assert r.content == generate_latest(registry)
        families = {f.name: f for f in text_string_to_metric_families(r.text)}
        (sample,) = [s for s in families["edgeship_inference_requests"].samples if s.name.endswith("_total")]
        assert (sample.labels, sample.value) == ({"version": "3"}, 5.0)
        buckets = {s.labels["le"]: s.value for s in families["edgeship_inference_latency_ms"].samples
                   if s.name.endswith("_bucket")}
        assert buckets == {"1.0": 0.0, "10.0": 1.0, "100.0": 1.0, "+Inf": 1.0}

        requests_total.labels(version="3").inc()  # read afresh on every request
        assert 'edgeship_inference_requests_total{version="3"} 6.0' in client.get(f"{server.url}/metrics",
                                                                                    timeout=10).text
        head = client.head(f"{server.url}/metrics", timeout=10)
        assert head.status_code == 200 and head.content == b"" and head.headers["Content-Type"] == PROMETHEUS_TEXT
        post = client.post(f"{server.url}/metrics", data=b"", timeout=10)
        assert post.status_code == 405 and post.headers["Allow"] == "GET, HEAD"


def test_no_callable_no_metrics(client: requests.Session) -> None:
    with _server() as server:
        r = client.get(f"{server.url}/metrics", timeout=10)
        assert (r.status_code, r.json()) == (404, {"error": "/metrics is not enabled on this agent"})


def test_a_failing_callable_is_a_logged_500(client: requests.Session, caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> bytes:
        raise RuntimeError("collector bug")

    with _server(broken) as server:
        r = client.get(f"{server.url}/metrics", timeout=10)
        assert r.status_code == 500 and "collector bug" not in r.text
        assert any("/metrics" in rec.getMessage() and rec.exc_info for rec in caplog.records)
        assert client.get(f"{server.url}/v2/health/live", timeout=10).status_code == 200
