"""Serve the dashboard's static page (packager/dashboard/static/) with the standard library's http.server.

The server only hands out files: the browser connects to the broker's WebSocket listener itself (MQTT.js), so the
broker's address and the fleet reach the page through `/config.json` and nothing else. Credentials are never in
it: the operator types them into the page. The set of files is read from the installed package once at start, so
a request can name only one of them (no path from the URL ever touches the file system).
"""

from __future__ import annotations

import json
import logging
import mimetypes
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Any
from urllib.parse import urlsplit

from packager.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8088"
_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".html": "text/html; charset=utf-8", ".json": "application/json", ".png": "image/png",
          ".md": "text/plain; charset=utf-8", ".txt": "text/plain; charset=utf-8"}


@dataclass(frozen=True)
class DashboardConfig:
    broker_ws: str  # ws[s]://HOST:PORT[/PATH], checked by parse_broker_ws
    fleet: str

    def to_json(self) -> bytes:
        return json.dumps({"broker_ws": self.broker_ws, "fleet": self.fleet}).encode()


def parse_broker_ws(url: str) -> str:
    """`url` if it is ws://HOST:PORT[/PATH] or wss://HOST:PORT[/PATH] without credentials, query or fragment;
    else InputError. A user name or password in it would end up in the page, so it is refused."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise InputError(f"--broker-ws {url!r}: {e}") from e
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise InputError(f"--broker-ws {url!r}: use ws://HOST:PORT or wss://HOST:PORT (the broker's websockets "
                         "listener)")
    if port is None:
        raise InputError(f"--broker-ws {url!r}: name the websockets listener's port (ws://HOST:PORT)")
    if parts.username is not None or parts.password is not None:
        raise InputError(f"--broker-ws {url!r}: no credentials in the URL; type them into the page")
    if parts.query or parts.fragment:
        raise InputError(f"--broker-ws {url!r}: no query or fragment")
    return url


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [ADDR]:PORT) to (host, port); InputError otherwise."""
    host, sep, port_text = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise InputError(f"--listen {value!r}: use HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host, int(port_text)


def static_files(root: Traversable | None = None) -> dict[str, tuple[bytes, str]]:
    """Every file under the package's static/ directory: URL path -> (bytes, content type)."""
    root = root if root is not None else files("packager.dashboard") / "static"
    out: dict[str, tuple[bytes, str]] = {}

    def walk(node: Traversable, prefix: str) -> None:
        for child in node.iterdir():
            path = f"{prefix}/{child.name}"
            if child.is_dir():
                walk(child, path)
            elif child.is_file():
                suffix = "." + child.name.rsplit(".", 1)[-1] if "." in child.name else ""
                ctype = _TYPES.get(suffix) or mimetypes.guess_type(child.name)[0] or "application/octet-stream"
                out[path] = (child.read_bytes(), ctype)

    walk(root, "")
    if "/index.html" not in out:
        raise InputError(f"the dashboard's static files are missing from the installed package ({root})")
    return out


def _csp(broker_ws: str) -> str:
    # The page loads only its own files and talks only to the broker it was started for.
    parts = urlsplit(broker_ws)
    return (f"default-src 'self'; connect-src 'self' {parts.scheme}://{parts.netloc}; img-src 'self' data:; "
            "style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
            # MQTT.js runs its keepalive timer in a blob: worker, so a background tab is not throttled into a timeout
            "worker-src 'self' blob:")


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, listen: tuple[str, int], config: DashboardConfig,
                 content: dict[str, tuple[bytes, str]] | None = None) -> None:
        self.config = config
        self.content = dict(content if content is not None else static_files())
        self.content["/config.json"] = (config.to_json(), "application/json")
        self.csp = _csp(config.broker_ws)
        if ":" in listen[0]:
            self.address_family = socket.AF_INET6
        super().__init__(listen, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = host if isinstance(host, str) else host.decode()
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"

    def start(self) -> threading.Thread:
        """Serve in a daemon thread (tests); `serve_forever()` for the command."""
        thread = threading.Thread(target=self.serve_forever, name="dashboard", daemon=True)
        thread.start()
        return thread


class _Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = "edgeship-dashboard"
    sys_version = ""

    def _answer(self, body_too: bool) -> None:
        path = urlsplit(self.path).path
        if path == "/":
            path = "/index.html"
        found = self.server.content.get(path)
        if found is None:
            self.send_error(404, "not found")
            return
        body, ctype = found
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", self.server.csp)
        self.end_headers()
        if body_too:
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(True)

    def do_HEAD(self) -> None:
        self._answer(False)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def make_server(listen: str, broker_ws: str, fleet: str) -> DashboardServer:
    """Check the arguments and bind; InputError (one line) for bad input or an address that cannot be bound."""
    host, port = parse_listen(listen)
    config = DashboardConfig(parse_broker_ws(broker_ws), fleet)
    try:
        return DashboardServer((host, port), config)
    except OSError as e:
        raise InputError(f"--listen {listen}: cannot listen there: {e.strerror or e}") from e
