"""Local inference over HTTP: the Open Inference Protocol v2 (KServe / Triton REST) on the standard library.

    GET  /v2                                          server metadata
    GET  /v2/health/live                              200 while the process answers
    GET  /v2/health/ready                             200 when a model is loaded, 503 before
    GET  /v2/models/<name>[/versions/<v>]             model metadata
    GET  /v2/models/<name>[/versions/<v>]/ready       200 when that model is served
    POST /v2/models/<name>[/versions/<v>]/infer       JSON tensors in, JSON tensors out (with an `id`)
    POST /v2/models/<name>/feedback                   `{"id", "label"}` for an earlier answer -> `{"id", "result"}`
    GET  /metrics                                     Prometheus text, from the `metrics` callable

Every inference answer carries an `id`: the request's, or a generated one. Feedback goes to the `feedback` sink
(FeedbackSink, agent.serve.holder); result "accepted", "unknown", "expired" or "duplicate", all 200. Without a sink
the feedback endpoint answers 404, and /metrics too without a `metrics` callable. A feedback body is at most
MAX_FEEDBACK_BYTES (64 KiB, else 413); a body that is not JSON, lacks `id`, or has a label of the wrong type or
shape is 400 and changes nothing.

Errors are `{"error": "<message>"}` with 400 (malformed request), 404 (unknown model or version, unknown
path), 405 (wrong method), 408 (body too slow), 411 (no Content-Length), 413 (body over the limit, or more rows
than the model's `max_batch`: the message names the limit), 500 (the model failed; logged) or 503 (no model yet,
or too many requests at once).

The protocol itself (bodies to arrays and back, metadata) is `agent.serve.oip`; this module is the server. After a
large body the freed memory is handed back to the system (`release_memory`).

Bounded against clients: each request must arrive whole within `timeout` seconds of the connection going idle
(so a slowloris client holds one thread for at most that long), bodies are limited before they are read,
connections and concurrent inferences are capped, and no exception reaches the client as a traceback.
HTTP/1.1 keep-alive is on (`protocol_version = "HTTP/1.1"`, every response carries Content-Length).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from agent import __version__
from agent.errors import ListenError, ServingError
from agent.limits import MAX_MESSAGE_BYTES
from agent.serve.holder import (
    FeedbackSink,
    LoadedModel,
    ModelHolder,
    RequestStats,
    check_model,
    release_memory,
)
from agent.serve.oip import MAX_FEEDBACK_BYTES, TRIM_AFTER_BYTES, model_metadata, run_feedback, run_infer

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8501
DEFAULT_MAX_BODY = MAX_MESSAGE_BYTES  # the same number as the MQTT maximum packet size the agent advertises
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_MAX_INFLIGHT = 4  # requests parsed/run at once: bounds memory (a 16 MiB JSON body is ~100+ MB as lists)

_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
_JSON = "application/json"
# prometheus_client.CONTENT_TYPE_PLAIN_0_0_4, what its generate_latest() writes (not imported: RSS)
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class _HttpError(Exception):
    """A protocol-level refusal decided before the request reaches the serving layer."""

    def __init__(self, status: int, message: str, close: bool = False,
                 headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.close = close
        self.headers = tuple(headers)


def _route(target: str) -> tuple[str, str | None, str | None] | None:
    """(endpoint, model name, version) for a request target, or None if it is no endpoint of ours."""
    parts = [unquote(p) for p in urlsplit(target).path.strip("/").split("/")]
    if parts == ["v2"]:
        return ("server", None, None)
    if parts == ["metrics"]:
        return ("metrics", None, None)
    if parts in (["v2", "health", "live"], ["v2", "health", "ready"]):
        return (f"health_{parts[2]}", None, None)
    if len(parts) < 3 or parts[:2] != ["v2", "models"] or not parts[2]:
        return None
    name, rest = parts[2], parts[3:]
    version: str | None = None
    if rest[:1] == ["versions"]:
        if len(rest) < 2 or not rest[1]:
            return None
        version, rest = rest[1], rest[2:]
    if not rest:
        return ("model", name, version)
    if rest == ["feedback"] and version is None:  # the id names the prediction: no version in the path
        return ("feedback", name, None)
    if rest in (["ready"], ["infer"]):
        return (rest[0], name, version)
    return None


def _served_as(holder: ModelHolder, name: str) -> LoadedModel | None:
    """The served model if it is called `name` (whom a refused request was for), else None."""
    model = holder.get()
    return model if model is not None and model.name == name else None


# --- the server ------------------------------------------------------------------------------------------------


class _DeadlineReader(io.RawIOBase):
    """Socket reads that fail with TimeoutError once the handler's current deadline has passed."""

    def __init__(self, sock: socket.socket, handler: _Handler) -> None:
        super().__init__()
        self._sock = sock
        self._handler = handler

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self._handler.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the client took too long to send its request")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response below sets Content-Length
    server_version = f"edgeship/{__version__}"
    sys_version = ""
    disable_nagle_algorithm = True
    wbufsize = 64 << 10  # headers and a small body leave in one send()
    server: _Server

    conn_timeout = DEFAULT_TIMEOUT_S
    deadline = 0.0
    _body_pending = False

    # -- connection plumbing --

    def setup(self) -> None:
        self.connection = self.request
        self.conn_timeout = self.server.conn_timeout
        self.connection.settimeout(self.conn_timeout)
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self.deadline = time.monotonic() + self.conn_timeout
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self), 64 << 10)
        self.wfile = self.connection.makefile("wb", self.wbufsize)

    def handle_one_request(self) -> None:
        # The whole next request (headers and body) must arrive within `timeout` of the connection going idle.
        self.deadline = time.monotonic() + self.conn_timeout
        self._body_pending = False
        super().handle_one_request()
        if self.server.closing:
            self.close_connection = True

    def handle_expect_100(self) -> bool:
        try:
            if self.command == "POST":
                route = _route(self.path)  # refuse a body we would refuse anyway before the client sends it
                self._content_length(MAX_FEEDBACK_BYTES if route is not None and route[0] == "feedback" else None)
        except _HttpError as e:
            self._send_error(e)
            return False
        super().handle_expect_100()
        self.wfile.flush()  # the interim 100 must leave now, not with the final answer
        return True

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's own refusals (bad request line, header too long, unknown method) as JSON."""
        with contextlib.suppress(ValueError):
            code = HTTPStatus(code)
        text = message or explain or (code.phrase if isinstance(code, HTTPStatus) else "error")
        self._send_json(int(code), {"error": text}, close=True)

    # -- methods --

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_OPTIONS(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        self._body_pending = "Transfer-Encoding" in self.headers or self.headers.get("Content-Length", "0") != "0"
        try:
            route = _route(self.path)
            if route is None:
                raise _HttpError(404, f"no such endpoint: {urlsplit(self.path).path}")
            endpoint, name, version = route
            allowed = ("POST",) if endpoint in ("infer", "feedback") else ("GET", "HEAD")
            if self.command not in allowed:
                raise _HttpError(405, f"{self.command} is not allowed on {urlsplit(self.path).path}; use "
                                 f"{' or '.join(allowed)}", headers=[("Allow", ", ".join(allowed))])
            if endpoint == "infer":
                assert name is not None
                self._infer(name, version)
            elif endpoint == "feedback":
                assert name is not None
                self._feedback(name)
            elif endpoint == "metrics":
                self._metrics()
            else:
                self._get(endpoint, name, version)
        except _HttpError as e:
            self._send_error(e)
        except ServingError as e:
            self._send_json(e.status, {"error": str(e)})
        except (TimeoutError, ConnectionError):
            raise  # the client is gone or too slow: nothing to answer
        except Exception:
            log.exception("HTTP %s %s failed", self.command, self.path)
            self._send_json(500, {"error": "internal server error (logged by the agent)"}, close=True)

    def _get(self, endpoint: str, name: str | None, version: str | None) -> None:
        holder = self.server.holder
        if endpoint == "server":
            self._send_json(200, {"name": "edgeship", "version": __version__, "extensions": ["classification"]})
        elif endpoint == "health_live":
            self._send_json(200, {"live": True})
        elif endpoint == "health_ready":
            if holder.get() is None:
                self._send_json(503, {"ready": False, "error": "no model is loaded yet"})
            else:
                self._send_json(200, {"ready": True})
        else:
            assert name is not None
            model = check_model(holder.get(), name, version)
            if endpoint == "ready":
                self._send_json(200, {"name": model.name, "ready": True})
            else:
                self._send_json(200, model_metadata(model))

    def _infer(self, name: str, version: str | None) -> None:
        server = self.server
        try:
            body = self._read_body()  # before taking a slot: a slow sender must not hold one
        except _HttpError:
            server.stats.record_rejected(model=_served_as(server.holder, name))
            raise
        if not server.inflight.acquire(timeout=server.conn_timeout):
            server.stats.record_rejected(model=_served_as(server.holder, name))
            raise _HttpError(503, "too many inference requests at once; retry later", headers=[("Retry-After", "1")])
        size = len(body)
        try:
            data = run_infer(server.holder, server.stats, body, name, version)
        finally:
            server.inflight.release()
            del body
            if size >= TRIM_AFTER_BYTES:
                release_memory()  # the body, its lists and arrays are gone: hand the memory back
        self._send_bytes(200, data)

    def _feedback(self, name: str) -> None:
        sink = self.server.feedback
        if sink is None:
            raise _HttpError(404, "feedback is not enabled on this agent")
        body = self._read_body(min(self.server.max_body, MAX_FEEDBACK_BYTES))
        self._send_bytes(200, run_feedback(sink, body, name))

    def _metrics(self) -> None:
        metrics = self.server.metrics
        if metrics is None:
            raise _HttpError(404, "/metrics is not enabled on this agent")
        self._send_bytes(200, metrics(), content_type=PROMETHEUS_TEXT)

    # -- reading and writing --

    def _content_length(self, limit: int | None = None) -> int:
        if "Transfer-Encoding" in self.headers:
            raise _HttpError(411, "Transfer-Encoding is not supported; send the body with a Content-Length",
                             close=True)
        values = self.headers.get_all("Content-Length") or []
        if not values:
            raise _HttpError(411, "Content-Length header required", close=True)
        if len(set(values)) > 1 or not _CONTENT_LENGTH.fullmatch(values[0].strip()):
            raise _HttpError(400, f"bad Content-Length {', '.join(values)!r}", close=True)
        n = int(values[0])
        limit = self.server.max_body if limit is None else limit
        if n > limit:
            raise _HttpError(413, f"request body of {n} bytes is over the limit of {limit} bytes", close=True)
        return n

    def _read_body(self, limit: int | None = None) -> bytes:
        n = self._content_length(limit)
        try:
            body = self.rfile.read(n)
        except TimeoutError as e:
            raise _HttpError(408, f"timed out reading the request body ({self.conn_timeout:g} s allowed per request)",
                             close=True) from e
        if len(body) != n:
            raise _HttpError(400, f"request body ended after {len(body)} of {n} bytes", close=True)
        self._body_pending = False
        return body

    def _send_error(self, e: _HttpError) -> None:
        self._send_json(e.status, {"error": str(e)}, close=e.close, headers=e.headers)

    def _send_json(self, status: int, obj: dict[str, Any], close: bool = False,
                   headers: Sequence[tuple[str, str]] = ()) -> None:
        self._send_bytes(status, json.dumps(obj, separators=(",", ":")).encode(), close, headers)

    def _send_bytes(self, status: int, body: bytes, close: bool = False,
                    headers: Sequence[tuple[str, str]] = (), content_type: str = _JSON) -> None:
        if self.request_version == "HTTP/0.9":  # no client speaks it; garbage request lines land here
            self.request_version = "HTTP/1.0"  # so the answer still has a status line and headers
        self.connection.settimeout(self.conn_timeout)  # writing gets its own bound: a client that never reads
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers:
            self.send_header(key, value)
        if close or self._body_pending or self.server.closing:
            self.send_header("Connection", "close")  # also sets close_connection
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck connection never blocks shutdown; each is bounded by the timeout anyway
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], holder: ModelHolder, stats: RequestStats, max_body: int,
                 conn_timeout: float, max_connections: int, max_inflight: int, feedback: FeedbackSink | None = None,
                 metrics: Callable[[], bytes] | None = None) -> None:
        self.holder = holder
        self.stats = stats
        self.feedback = feedback
        self.metrics = metrics
        self.max_body = max_body
        self.conn_timeout = conn_timeout
        self.closing = False
        self.inflight = threading.BoundedSemaphore(max_inflight)
        self._slots = threading.BoundedSemaphore(max_connections)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Condition()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN (a reverse-DNS wait on devices without DNS): skip it.
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open.discard(request)
                self._open_lock.notify_all()
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        body = b'{"error":"too many connections; retry later"}'
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: {_JSON}\r\nContent-Length: {len(body)}\r\n"
                "Retry-After: 1\r\nConnection: close\r\n\r\n").encode()
        log.warning("refusing a connection: %d connections open", len(self._open))
        try:
            request.settimeout(1.0)
            request.sendall(head + body)
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # reset, broken pipe, timeout: the client's doing
            log.debug("connection from %s ended: %r", client_address, exc)
        else:
            log.error("unhandled error serving %s", client_address, exc_info=True)

    def close_connections(self, grace: float) -> int:
        """Wake every connection thread waiting for a request so it closes, and wait up to `grace` seconds for
        requests already read to be answered. Returns how many connections were still open after that."""
        self.closing = True
        with self._open_lock:
            conns = list(self._open)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RD)
        with self._open_lock:
            self._open_lock.wait_for(lambda: not self._open, timeout=grace)
            return len(self._open)


class _Server6(_Server):
    address_family = socket.AF_INET6


class InferenceServer:
    """The OIP v2 REST API over `holder`, recording into `stats`, on a background thread.

    `port=0` binds a free port; `.port` is the actual one once started. `feedback`: where labels go (None: the
    feedback endpoint answers 404). `metrics`: returns the Prometheus text GET /metrics answers (None: 404).
    """

    def __init__(
        self,
        holder: ModelHolder,
        stats: RequestStats,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        max_body: int = DEFAULT_MAX_BODY,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        feedback: FeedbackSink | None = None,
        metrics: Callable[[], bytes] | None = None,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0..65535, got {port}")
        if max_body < 1:
            raise ValueError(f"max_body must be >= 1 byte, got {max_body}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if max_connections < 1 or max_inflight < 1:
            raise ValueError("max_connections and max_inflight must be >= 1")
        self.holder = holder
        self.stats = stats
        self.host = host
        self._port = port
        self.max_body = max_body
        self.timeout = timeout
        self.max_connections = max_connections
        self.max_inflight = max_inflight
        self.feedback = feedback
        self.metrics = metrics
        self._bound_port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_port if self._server is not None else self._bound_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the inference server is already running")
        cls = _Server6 if ":" in self.host else _Server
        try:
            server = cls((self.host, self._port), self.holder, self.stats, self.max_body, self.timeout,
                         self.max_connections, self.max_inflight, self.feedback, self.metrics)
        except OSError as e:
            raise ListenError(f"cannot listen on {self.host}:{self._port}: {e.strerror or e}") from e
        self._server = server
        self._bound_port = server.server_port
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="edgeship-http", daemon=True)
        self._thread.start()
        log.info("inference API listening on %s", self.url)

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting, close idle connections, give requests being answered up to `grace` seconds (default:
        the request timeout) to finish. Idempotent."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        left = server.close_connections(self.timeout if grace is None else grace)
        if left:
            log.warning("inference API stopped with %d connection(s) still busy", left)
        if thread is not None:
            thread.join()
        self._server = self._thread = None
        log.info("inference API stopped")

    def __enter__(self) -> InferenceServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
