"""`packager dashboard`: argument checks (one line, exit 2), the static files served from the installed package,
the page's config (broker and fleet, never credentials) and the headers that keep the page to its own files and
its broker."""

from __future__ import annotations

import http.client
import json
import re
import socket
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from packager.cli import main
from packager.dashboard import server as ds
from packager.errors import InputError

STATIC = Path(ds.__file__).parent / "static"


@pytest.fixture
def running() -> Iterator[ds.DashboardServer]:
    srv = ds.make_server("127.0.0.1:0", "ws://127.0.0.1:9001", "lab")
    srv.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def get(srv: ds.DashboardServer, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=10)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


@pytest.mark.parametrize("url", ["ws://127.0.0.1:9001", "wss://broker.example:8884/mqtt", "ws://[::1]:9001"])
def test_broker_ws_accepted(url: str) -> None:
    assert ds.parse_broker_ws(url) == url


@pytest.mark.parametrize(("url", "why"), [
    ("mqtt://127.0.0.1:1883", "ws://HOST:PORT"), ("ws://127.0.0.1", "port"), ("ws://:9001", "ws://HOST:PORT"),
    ("ws://user:secret@127.0.0.1:9001", "no credentials"), ("ws://127.0.0.1:9001/?x=1", "no query"),
    ("ws://127.0.0.1:99999", "out of range"), ("127.0.0.1:9001", "ws://HOST:PORT"),
])
def test_broker_ws_refused(url: str, why: str) -> None:
    with pytest.raises(InputError, match=why):
        ds.parse_broker_ws(url)


@pytest.mark.parametrize(("value", "expected"), [("127.0.0.1:8088", ("127.0.0.1", 8088)),
                                                 ("[::1]:0", ("::1", 0)), ("localhost:80", ("localhost", 80))])
def test_listen_accepted(value: str, expected: tuple[str, int]) -> None:
    assert ds.parse_listen(value) == expected


@pytest.mark.parametrize("value", ["8088", "127.0.0.1", ":8088", "127.0.0.1:http", "127.0.0.1:70000", ""])
def test_listen_refused(value: str) -> None:
    with pytest.raises(InputError, match="--listen"):
        ds.parse_listen(value)


@pytest.mark.parametrize(("argv", "message"), [
    (["--broker-ws", "mqtt://127.0.0.1:1883"], "--broker-ws"),
    (["--broker-ws", "ws://u:p@127.0.0.1:9001"], "no credentials"),
    (["--broker-ws", "ws://127.0.0.1:9001", "--fleet", "a/b"], "--fleet"),
    (["--broker-ws", "ws://127.0.0.1:9001", "--fleet", "+"], "--fleet"),
    (["--broker-ws", "ws://127.0.0.1:9001", "--listen", "nowhere"], "--listen"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv: list[str], message: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dashboard", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("packager: error: ")


def test_cli_address_in_use_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["dashboard", "--broker-ws", "ws://127.0.0.1:9001", "--listen", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot listen there" in err


def test_serves_the_page_and_its_vendored_scripts(running: ds.DashboardServer) -> None:
    status, headers, body = get(running, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert body == (STATIC / "index.html").read_bytes()
    for path in ("/app.js", "/style.css", "/vendor/mqtt.min.js", "/vendor/uPlot.iife.min.js"):
        status, headers, body = get(running, path)
        assert status == 200 and body == (STATIC / path.lstrip("/")).read_bytes(), path
    assert get(running, "/app.js")[1]["content-type"].startswith("text/javascript")
    status, headers, body = get(running, "/app.js", method="HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) == (STATIC / "app.js").stat().st_size


def test_vendored_scripts_name_their_version_and_licence() -> None:
    versions = (STATIC / "vendor" / "VERSIONS").read_text()
    assert "mqtt " in versions and "uplot " in versions
    assert "MIT" in (STATIC / "vendor" / "mqtt.LICENSE.md").read_text()
    assert "MIT" in (STATIC / "vendor" / "uplot.LICENSE").read_text()


def test_config_names_broker_and_fleet_only(running: ds.DashboardServer) -> None:
    status, _, body = get(running, "/config.json")
    assert status == 200 and json.loads(body) == {"broker_ws": "ws://127.0.0.1:9001", "fleet": "lab"}


@pytest.mark.parametrize("path", ["/../server.py", "/..%2fserver.py", "/static/index.html", "/etc/passwd",
                                  "/vendor/", "/nothing.js"])
def test_only_the_packaged_files_are_served(running: ds.DashboardServer, path: str) -> None:
    assert get(running, path)[0] == 404


def test_headers_keep_the_page_to_its_files_and_its_broker(running: ds.DashboardServer) -> None:
    _, headers, _ = get(running, "/")
    csp = headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert "connect-src 'self' ws://127.0.0.1:9001" in csp
    assert headers["x-content-type-options"] == "nosniff" and headers["cache-control"] == "no-store"


def test_missing_static_files_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="static files are missing"):
        ds.static_files(tmp_path)


# --- the recipes in docs/dashboard.md, as far as they can be checked offline -------------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs" / "dashboard.md"
FLOW = Path(__file__).resolve().parents[2] / "examples" / "node-red-flow.json"


def test_node_red_flow_is_well_formed() -> None:
    nodes = json.loads(FLOW.read_text())
    by_id = {n["id"]: n for n in nodes}
    assert len(by_id) == len(nodes)
    (broker,) = [n for n in nodes if n["type"] == "mqtt-broker"]
    tabs = {n["id"] for n in nodes if n["type"] == "tab"}
    mqtt_in = [n for n in nodes if n["type"] == "mqtt in"]
    assert {n["topic"].rsplit("/", 1)[1] for n in mqtt_in} == {"telemetry", "state", "events"}
    for n in mqtt_in:
        assert n["broker"] == broker["id"] and n["datatype"] == "json"
        assert re.fullmatch(r"edgeship/[A-Za-z0-9._-]+/devices/\+/(telemetry|state|events)", n["topic"])
    for n in nodes:
        if n["type"] in ("tab", "mqtt-broker"):
            continue
        assert n["z"] in tabs
        assert len(n["wires"]) == n.get("outputs", len(n["wires"])), n["id"]
        for out in n["wires"]:
            assert all(target in by_id for target in out), n["id"]


def test_telegraf_recipe_parses_and_reads_the_telemetry_topics() -> None:
    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(), re.S)
    assert len(blocks) == 1
    conf = tomllib.loads(blocks[0])
    (consumer,) = conf["inputs"]["mqtt_consumer"]
    assert consumer["topics"] == ["edgeship/+/devices/+/telemetry"] and consumer["data_format"] == "json"
    assert consumer["persistent_session"] is True and consumer["qos"] == 1 and consumer["client_id"]
    assert consumer["json_time_key"] == "ts" and consumer["json_time_format"] == "unix"
    (parsing,) = consumer["topic_parsing"]
    levels, tags = parsing["topic"].split("/"), parsing["tags"].split("/")
    assert len(levels) == len(tags) and tags[1] == "fleet" and tags[3] == "device"
    assert conf["outputs"]["influxdb_v2"][0]["bucket"]


def test_docs_acl_reads_the_device_topics_only() -> None:
    text = DOCS.read_text()
    assert "user dashboard\ntopic read edgeship/lab/devices/#\n" in text
    assert re.search(r"listener 1883 127\.0\.0\.1\nlistener 9001 127\.0\.0\.1\nprotocol websockets", text)
