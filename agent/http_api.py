"""Local inference over HTTP: the Open Inference Protocol v2 (KServe / Triton REST) on the standard library.

    GET  /v2                                          server metadata
    GET  /v2/health/live                              200 while the process answers
    GET  /v2/health/ready                             200 when a model is loaded, 503 before
    GET  /v2/models/<name>[/versions/<v>]             model metadata
    GET  /v2/models/<name>[/versions/<v>]/ready       200 when that model is served
    POST /v2/models/<name>[/versions/<v>]/infer       JSON tensors in, JSON tensors out

Errors are `{"error": "<message>"}` with 400 (malformed request), 404 (unknown model or version, unknown
path), 405 (wrong method), 408 (body too slow), 411 (no Content-Length), 413 (body over the limit, or more rows
than the model's `max_batch`: the message names the limit), 500 (the model failed; logged) or 503 (no model yet,
or too many requests at once).

Memory: a batch over the limit is refused from the shapes in the body before its tensors are decoded where the
body allows it (`declared_batches`), else right after the JSON is parsed and before any array is built; after a
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
import math
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from agent import __version__
from agent.errors import EdgeshipError
from agent.limits import MAX_MESSAGE_BYTES
from agent.serving import (
    DATATYPES,
    BadRequest,
    BatchTooLarge,
    InferResult,
    LoadedModel,
    ModelHolder,
    ModelNotReady,
    RequestStats,
    ServingError,
    check_batch,
    check_model,
    datatype_of,
    release_memory,
)

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8501
DEFAULT_MAX_BODY = MAX_MESSAGE_BYTES  # the same number as the MQTT maximum packet size the agent advertises
# Bodies at least this long are first scanned for their shapes (declared_batches) so an oversize batch is refused
# without decoding its data; after one this long, freed memory is handed back (release_memory, ~0.1 ms).
PRECHECK_BYTES = 64 << 10
TRIM_AFTER_BYTES = 1 << 20
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_MAX_INFLIGHT = 4  # requests parsed/run at once: bounds memory (a 16 MiB JSON body is ~100+ MB as lists)

PLATFORMS = {"onnx": "onnxruntime_onnx", "tflite": "tensorflow_lite"}
_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")
_JSON = "application/json"


class ListenError(EdgeshipError):
    """The inference server could not listen on its address (in use, not permitted, no such interface)."""


class _HttpError(Exception):
    """A protocol-level refusal decided before the request reaches the serving layer."""

    def __init__(self, status: int, message: str, close: bool = False,
                 headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.close = close
        self.headers = tuple(headers)


# --- the JSON tensor codec (pure) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None
    model_name: str | None = None  # only where there is no URL to say it (MQTT)
    model_version: str | None = None


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


# A run of characters that only numbers, commas, whitespace and brackets are made of. The look-behind makes it
# start only where such a run starts, so the scan is linear whatever the body holds.
_NUMERIC_RUN = re.compile(rb"(?<![-0-9eE.+,\s\[\]])[-0-9eE.+,\s\[\]]{1024,}")
_NOT_BRACKET = b"-0123456789eE.+, \t\n\r\f\v"


def _skeleton_run(m: re.Match[bytes]) -> bytes:
    run = m.group()
    ends = [i for i in (run.find(b"["), run.find(b"]"), run.rfind(b"["), run.rfind(b"]")) if i >= 0]
    if not ends:
        return run
    first, last = min(ends), max(ends)
    core = run[first:last + 1].translate(None, _NOT_BRACKET).replace(b"][", b"],[")
    return run[:first] + core + run[last + 1:]


def declared_batches(body: bytes) -> dict[str, list[int]] | None:
    """Each input's declared shape, read without decoding the tensor data; None where the body does not allow it.

    Long runs of numbers inside brackets (the `data` arrays) are reduced to their bracket structure (`[[],[]]`)
    and the rest is parsed as JSON: the keys, names and short arrays such as `shape` are untouched, so a shape read
    here is the one the full parse would read. Used only to refuse early: whatever it cannot read, the full parse
    still checks."""
    try:
        doc = json.loads(_NUMERIC_RUN.sub(_skeleton_run, body))
    except (ValueError, RecursionError):
        return None
    raw_inputs = doc.get("inputs") if isinstance(doc, dict) else None
    if not isinstance(raw_inputs, list):
        return None
    out: dict[str, list[int]] = {}
    for raw in raw_inputs:
        if not isinstance(raw, dict):
            continue
        name, shape = raw.get("name"), raw.get("shape")
        if (isinstance(name, str) and isinstance(shape, list) and shape
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            out[name] = shape
    return out


def parse_infer_request(body: bytes, max_batch: int | None = None, model_name: str = "") -> InferRequest:
    """An OIP inference request body as numpy arrays in the datatypes the client declared. BadRequest if not.

    With `max_batch`, an input whose leading dimension is over it is refused (BatchTooLarge, naming the limit and
    `model_name`) before its data becomes an array, and for a body of PRECHECK_BYTES or more before it is parsed."""
    if max_batch is not None and len(body) >= PRECHECK_BYTES:
        declared = declared_batches(body)
        if declared:
            check_batch(declared, max_batch, model_name)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"request body is not valid UTF-8 (byte {e.start})") from e
    try:
        doc = json.loads(text, parse_constant=_no_constants)
    except json.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    except ValueError as e:  # NaN/Infinity, or an integer too long to convert
        raise BadRequest(f"request body is not valid JSON: {e}") from e
    except RecursionError as e:
        raise BadRequest("request body is not valid JSON: nested too deeply") from e
    if not isinstance(doc, dict):
        raise BadRequest(f"request body must be a JSON object, got {_json_type(doc)}")

    req_id = doc.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise BadRequest(f"'id' must be a string, got {_json_type(req_id)}")
    target: dict[str, str | None] = {}
    for key in ("model_name", "model_version"):
        value = doc.get(key)
        if value is not None and not isinstance(value, str):
            raise BadRequest(f"{key!r} must be a string, got {_json_type(value)}")
        target[key] = value
    if "parameters" in doc and not isinstance(doc["parameters"], dict):
        raise BadRequest(f"'parameters' must be an object, got {_json_type(doc['parameters'])}")
    if "inputs" not in doc:
        raise BadRequest("request has no 'inputs'")
    raw_inputs = doc["inputs"]
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    inputs: dict[str, np.ndarray] = {}
    for i, raw in enumerate(raw_inputs):
        name, arr = _tensor(i, raw, max_batch, model_name)
        if name in inputs:
            raise BadRequest(f"input {name!r} is given more than once")
        inputs[name] = arr

    outputs: list[str] | None = None
    if doc.get("outputs") is not None:
        raw_outputs = doc["outputs"]
        if not isinstance(raw_outputs, list):
            raise BadRequest(f"'outputs' must be a list, got {_json_type(raw_outputs)}")
        outputs = []
        for j, o in enumerate(raw_outputs):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise BadRequest(f"outputs[{j}] must be an object with a string 'name'")
            outputs.append(o["name"])
    return InferRequest(id=req_id, inputs=inputs, outputs=outputs, **target)


def _tensor(i: int, raw: Any, max_batch: int | None = None, model_name: str = "") -> tuple[str, np.ndarray]:
    if not isinstance(raw, dict):
        raise BadRequest(f"inputs[{i}] must be an object, got {_json_type(raw)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"inputs[{i}] needs a string 'name'")
    where = f"input {name!r}"
    for key in ("shape", "datatype", "data"):
        if key not in raw:
            raise BadRequest(f"{where} has no {key!r}")
    params = raw.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise BadRequest(f"{where}: 'parameters' must be an object")
    if params and "binary_data_size" in params:
        raise BadRequest(f"{where}: binary tensor data is not supported; send 'data' as JSON")

    datatype = raw["datatype"]
    if not isinstance(datatype, str):
        raise BadRequest(f"{where}: 'datatype' must be a string, got {_json_type(datatype)}")
    if datatype == "BYTES":
        raise BadRequest(f"{where}: BYTES tensors are not supported; this server takes numeric tensors")
    if datatype not in DATATYPES:
        raise BadRequest(f"{where}: unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}")
    dtype = np.dtype(DATATYPES[datatype])

    shape = raw["shape"]
    if (not isinstance(shape, list) or len(shape) > 32
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise BadRequest(f"{where}: 'shape' must be a list of at most 32 non-negative integers, got {shape!r}")
    if max_batch is not None:
        check_batch({name: shape}, max_batch, model_name)  # before 'data' becomes an array

    data = raw["data"]
    if not isinstance(data, list):
        raise BadRequest(f"{where}: 'data' must be a list (flat or nested), got {_json_type(data)}")
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError) as e:
        raise BadRequest(f"{where}: 'data' is ragged (nested lists of unequal lengths) or not numeric") from e
    kind = arr.dtype.kind
    if kind in "USO":
        raise BadRequest(f"{where}: {datatype} data must be {_expected(dtype)}; 'data' holds strings, nulls, "
                         "objects, ragged lists or integers too large for 64 bits")
    mismatch = (dtype.kind == "b") != (kind == "b") or (dtype.kind in "iu" and kind == "f")
    if mismatch and not (arr.size == 0 and kind == "f"):  # [] reads as float64: fine for any datatype
        raise BadRequest(f"{where}: {datatype} data must be {_expected(dtype)}, got {_found(kind)}")
    if dtype.kind in "iu" and kind in "iu" and arr.size:
        info = np.iinfo(dtype)
        if int(arr.min()) < info.min or int(arr.max()) > info.max:
            raise BadRequest(f"{where}: values outside the {datatype} range [{info.min}, {info.max}]")
    with np.errstate(over="ignore", invalid="ignore"):
        arr = arr.astype(dtype, copy=False)
    if dtype.kind == "f" and kind == "f" and arr.size and not bool(np.isfinite(arr).all()):
        raise BadRequest(f"{where}: values overflow {datatype}")

    needed = math.prod(shape)
    if needed != arr.size:
        raise BadRequest(f"{where}: shape {shape} needs {needed} values, 'data' has {arr.size}")
    try:
        return name, arr.reshape(shape)
    except ValueError as e:  # cannot happen once the sizes agree; kept so no numpy error reaches the client raw
        raise BadRequest(f"{where}: cannot reshape data to {shape}: {e}") from e


def _expected(dtype: np.dtype[Any]) -> str:
    return {"b": "true/false", "i": "integers", "u": "non-negative integers"}.get(dtype.kind, "numbers")


def _found(kind: str) -> str:
    return {"b": "true/false", "f": "non-integer numbers", "i": "integers", "u": "integers"}.get(kind, "other values")


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    return "an object"


def encode_infer_response(result: InferResult, request_id: str | None) -> dict[str, Any]:
    outputs = []
    for name, arr in result.outputs.items():
        arr = np.asarray(arr)
        outputs.append({"name": name, "datatype": datatype_of(arr.dtype), "shape": list(arr.shape),
                        "data": arr.ravel().tolist()})
    return {
        "model_name": result.model.name,
        "model_version": str(result.model.version),
        "id": request_id if request_id is not None else uuid.uuid4().hex,
        "outputs": outputs,
    }


def model_metadata(model: LoadedModel) -> dict[str, Any]:
    def tensor(s: Any) -> dict[str, Any]:
        return {"name": s.name, "datatype": datatype_of(s.dtype), "shape": list(s.shape)}

    return {
        "name": model.name,
        "versions": [str(model.version)],
        "platform": PLATFORMS.get(model.fmt, model.fmt),
        "inputs": [tensor(s) for s in model.inputs],
        "outputs": [tensor(s) for s in model.outputs],
    }


def _route(target: str) -> tuple[str, str | None, str | None] | None:
    """(endpoint, model name, version) for a request target, or None if it is no endpoint of ours."""
    parts = [unquote(p) for p in urlsplit(target).path.strip("/").split("/")]
    if parts == ["v2"]:
        return ("server", None, None)
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
    if rest in (["ready"], ["infer"]):
        return (rest[0], name, version)
    return None


def run_infer(holder: ModelHolder, stats: RequestStats, body: bytes, name: str | None = None,
              version: str | None = None) -> bytes:
    """Parse an OIP request body, run it on the served model, return the response body; record the outcome.

    `name`/`version` come from the URL; None takes the body's `model_name`/`model_version` (MQTT has no URL),
    and with no name there either, whatever model is being served. Raises ServingError (with `.status`).
    """
    start = time.perf_counter()
    try:
        served = holder.get()
        limit: int | None = None
        if served is not None and (name is None or name == served.name):
            limit = holder.batch_limit(served)  # holder.infer checks again, on the model it runs
        request = parse_infer_request(body, limit, served.name if served is not None else "")
        if name is None:
            version = request.model_version
            name = request.model_name
            if name is None:
                served = holder.get()
                if served is None:
                    raise ModelNotReady("no model is loaded yet")
                name = served.name
        result = holder.infer(name, version, request.inputs, request.outputs)
        data = json.dumps(encode_infer_response(result, request.id), separators=(",", ":")).encode()
    except ServingError as e:
        if e.status >= 500 and not isinstance(e, ModelNotReady):  # the model's failure, not the client's
            stats.record_error()
            log.warning("inference on %s failed: %s", name, e)
        else:
            stats.record_rejected()
            if isinstance(e, BatchTooLarge):
                log.info("refused an inference request: %s", e)
        raise
    except Exception:
        stats.record_error()
        raise
    stats.record_ok((time.perf_counter() - start) * 1000.0, tag=result.model)
    return data


def answer_mqtt_request(holder: ModelHolder, stats: RequestStats, payload: bytes,
                        max_body: int = DEFAULT_MAX_BODY) -> bytes:
    """The answer to an MQTT inference request (`devices/<id>/infer/request`): never raises.

    The payload is the HTTP infer body, optionally with `model_name` / `model_version` (default: the model being
    served). The answer is the HTTP response body, or `{"error": ..., "status": <the HTTP status>}`.
    """
    def error(status: int, message: str) -> bytes:
        return json.dumps({"error": message, "status": status}, separators=(",", ":")).encode()

    if len(payload) > max_body:
        stats.record_rejected()
        log.warning("refused an MQTT inference request of %d bytes: over the limit of %d bytes", len(payload),
                    max_body)
        return error(413, f"request of {len(payload)} bytes is over the limit of {max_body} bytes")
    try:
        return run_infer(holder, stats, bytes(payload))
    except ServingError as e:
        return error(e.status, str(e))
    except Exception:
        log.exception("MQTT inference request failed")
        return error(500, "internal server error (logged by the agent)")
    finally:
        if len(payload) >= TRIM_AFTER_BYTES:
            release_memory()


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
                self._content_length()  # refuse a body we would refuse anyway before the client sends it
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
            allowed = ("POST",) if endpoint == "infer" else ("GET", "HEAD")
            if self.command not in allowed:
                raise _HttpError(405, f"{self.command} is not allowed on {urlsplit(self.path).path}; use "
                                 f"{' or '.join(allowed)}", headers=[("Allow", ", ".join(allowed))])
            if endpoint == "infer":
                assert name is not None
                self._infer(name, version)
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
            self._send_json(200, {"name": "edgeship", "version": __version__, "extensions": []})
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
            server.stats.record_rejected()
            raise
        if not server.inflight.acquire(timeout=server.conn_timeout):
            server.stats.record_rejected()
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

    # -- reading and writing --

    def _content_length(self) -> int:
        if "Transfer-Encoding" in self.headers:
            raise _HttpError(411, "Transfer-Encoding is not supported; send the body with a Content-Length",
                             close=True)
        values = self.headers.get_all("Content-Length") or []
        if not values:
            raise _HttpError(411, "Content-Length header required", close=True)
        if len(set(values)) > 1 or not _CONTENT_LENGTH.fullmatch(values[0].strip()):
            raise _HttpError(400, f"bad Content-Length {', '.join(values)!r}", close=True)
        n = int(values[0])
        if n > self.server.max_body:
            raise _HttpError(413, f"request body of {n} bytes is over the limit of {self.server.max_body} bytes",
                             close=True)
        return n

    def _read_body(self) -> bytes:
        n = self._content_length()
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
                    headers: Sequence[tuple[str, str]] = ()) -> None:
        if self.request_version == "HTTP/0.9":  # no client speaks it; garbage request lines land here
            self.request_version = "HTTP/1.0"  # so the answer still has a status line and headers
        self.connection.settimeout(self.conn_timeout)  # writing gets its own bound: a client that never reads
        self.send_response(status)
        self.send_header("Content-Type", _JSON)
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
                 conn_timeout: float, max_connections: int, max_inflight: int) -> None:
        self.holder = holder
        self.stats = stats
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

    `port=0` binds a free port; `.port` is the actual one once started.
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
                         self.max_connections, self.max_inflight)
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
