"""The Open Inference Protocol v2 (KServe / Triton REST) as data: request bodies to numpy arrays, results to
response bodies, model metadata, and one inference run against the served model. Pure of any server: the HTTP
server (`agent.serve.http`) and MQTT inference (`agent.serve.mqtt`) both speak through it. Labelled feedback
(`{"id", "label"}` for an earlier answer's id) is parsed and handed to a FeedbackSink here too (`run_feedback`).

Memory: a batch over the limit is refused from the shapes in the body before its tensors are decoded where the
body allows it (`declared_batches`), else right after the JSON is parsed and before any array is built.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.bundle import Labels
from agent.errors import BadRequest, BatchTooLarge, InferenceFailed, ModelNotReady, ServingError
from agent.preprocess import raw_shape, top_k
from agent.serve.holder import (
    DATATYPES,
    FeedbackSink,
    InferResult,
    LoadedModel,
    ModelHolder,
    RequestStats,
    check_batch,
    datatype_of,
)

log = logging.getLogger(__name__)

# Bodies at least this long are first scanned for their shapes (declared_batches) so an oversize batch is refused
# without decoding its data; after one this long, freed memory is handed back (release_memory, ~0.1 ms).
PRECHECK_BYTES = 64 << 10
TRIM_AFTER_BYTES = 1 << 20
PLATFORMS = {"onnx": "onnxruntime_onnx", "tflite": "tensorflow_lite"}


MAX_CLASSIFICATION = 65536  # the most classes one answer may name per row (the manifest's label bound)


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None
    model_name: str | None = None  # only where there is no URL to say it (MQTT)
    model_version: str | None = None
    preprocessed: bool = False  # `parameters.preprocessed`: the inputs are model-ready, skip the bundle's steps
    classification: int | None = None  # `parameters.classification`: top-k names in an extra `classification` output
    classify: dict[str, int] | None = None  # per output `parameters.classification` (Triton): that output as top-k


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
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise BadRequest(f"'parameters' must be an object, got {_json_type(params)}")
    preprocessed = params.get("preprocessed", False)
    if not isinstance(preprocessed, bool):
        raise BadRequest(f"'parameters.preprocessed' must be true or false, got {_json_type(preprocessed)}")
    classification = _top_k(params.get("classification"), "'parameters.classification'")
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
    classify: dict[str, int] = {}
    if doc.get("outputs") is not None:
        raw_outputs = doc["outputs"]
        if not isinstance(raw_outputs, list):
            raise BadRequest(f"'outputs' must be a list, got {_json_type(raw_outputs)}")
        outputs = []
        for j, o in enumerate(raw_outputs):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise BadRequest(f"outputs[{j}] must be an object with a string 'name'")
            outputs.append(o["name"])
            o_params = o.get("parameters", {})
            if not isinstance(o_params, dict):
                raise BadRequest(f"outputs[{j}]: 'parameters' must be an object")
            k = _top_k(o_params.get("classification"), f"outputs[{j}] 'parameters.classification'")
            if k is not None:
                classify[o["name"]] = k
    return InferRequest(id=req_id, inputs=inputs, outputs=outputs, preprocessed=preprocessed,
                        classification=classification, classify=classify or None, **target)


def _top_k(v: Any, what: str) -> int | None:
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_CLASSIFICATION:
        raise BadRequest(f"{what} must be an integer from 1 to {MAX_CLASSIFICATION} (how many classes), got {v!r}"
                         if not isinstance(v, (dict, list, str)) else f"{what} must be an integer, got {_json_type(v)}")
    return v


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
    # integers overflow too: 70000 as FP16 is inf (JSON itself has no NaN or Infinity)
    if dtype.kind == "f" and arr.size and not bool(np.isfinite(arr).all()):
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


def encode_infer_response(result: InferResult, request_id: str | None,
                          request: InferRequest | None = None) -> dict[str, Any]:
    """The OIP answer. With `request`'s classification parameters (module `agent.preprocess`): an output asked for
    with `parameters.classification` k comes back as Triton's classification extension has it, BYTES
    [batch, k] strings `<score>:<index>[:<name>]`; the request-level `parameters.classification` k keeps every
    output raw and adds an output named `classification` (the bundle's labelled output, else the first) in that
    form, plus `parameters.labels` on it: the names as a [batch][k] list."""
    classify = (request.classify if request is not None else None) or {}
    labels = result.model.manifest.labels if result.model.manifest is not None else None
    outputs = []
    for name, arr in result.outputs.items():
        if name in classify:
            outputs.append(_classified(name, arr, classify[name], labels if _labelled(labels, name) else None))
            continue
        arr = np.asarray(arr)
        outputs.append({"name": name, "datatype": datatype_of(arr.dtype), "shape": list(arr.shape),
                        "data": arr.ravel().tolist()})
    if request is not None and request.classification is not None:
        if "classification" in result.outputs:
            raise BadRequest("the model has an output named 'classification': ask for top-k classes with "
                             "outputs[].parameters.classification instead")
        target = labels.output if labels is not None else next(iter(result.all_outputs))
        tensor = _classified("classification", result.all_outputs[target], request.classification,
                             labels if _labelled(labels, target) else None)
        outputs.append(tensor)
    return {
        "model_name": result.model.name,
        "model_version": str(result.model.version),
        "id": request_id if request_id is not None else uuid.uuid4().hex,
        "outputs": outputs,
    }


def _labelled(labels: Labels | None, output: str) -> bool:
    return labels is not None and labels.output == output


def _classified(name: str, arr: np.ndarray, k: int, labels: Labels | None) -> dict[str, Any]:
    arr = np.asarray(arr)
    if arr.ndim < 2:
        raise BadRequest(f"output {name!r} has shape {list(arr.shape)}: classification needs [batch, classes]")
    if arr.dtype.kind not in "fiu":
        raise BadRequest(f"output {name!r} is {datatype_of(arr.dtype)}: classification needs numbers")
    rows = top_k(arr, k, labels)
    width = len(rows[0]) if rows else min(k, int(np.prod(arr.shape[1:])))
    out: dict[str, Any] = {"name": name, "datatype": "BYTES", "shape": [len(rows), width],
                           "data": [c.triton() for row in rows for c in row]}
    if labels is not None:
        out["parameters"] = {"labels": [[c.name for c in row] for row in rows],
                             "scores": [[c.score for c in row] for row in rows]}
    return out


def model_metadata(model: LoadedModel) -> dict[str, Any]:
    """OIP model metadata. `inputs`/`outputs` are the model's own tensors (what a client that sends preprocessed
    data sends); `parameters.preprocessing` (the manifest's steps and `raw_input`: what a client sends raw) and
    `parameters.labels` (the labelled output, how scores are made, the names) are there when the bundle has them."""
    def tensor(s: Any) -> dict[str, Any]:
        return {"name": s.name, "datatype": datatype_of(s.dtype), "shape": list(s.shape)}

    doc: dict[str, Any] = {
        "name": model.name,
        "versions": [str(model.version)],
        "platform": PLATFORMS.get(model.fmt, model.fmt),
        "inputs": [tensor(s) for s in model.inputs],
        "outputs": [tensor(s) for s in model.outputs],
    }
    manifest = model.manifest
    params: dict[str, Any] = {}
    spec = manifest.preprocess if manifest is not None else None
    target = next((s for s in model.inputs if spec is not None and s.name == spec.input), None)
    if spec is not None and target is not None:
        params["preprocessing"] = {**spec.to_json(), "raw_input": {
            "name": spec.input, "datatype": datatype_of(spec.dtype), "shape": raw_shape(spec, target)}}
    if manifest is not None and manifest.labels is not None:
        params["labels"] = manifest.labels.to_json()
    if params:
        doc["parameters"] = params
    return doc


def run_infer(holder: ModelHolder, stats: RequestStats, body: bytes, name: str | None = None,
              version: str | None = None) -> bytes:
    """Parse an OIP request body, run it on the served model, return the response body; record the outcome.

    `name`/`version` come from the URL; None takes the body's `model_name`/`model_version` (MQTT has no URL),
    and with no name there either, whatever model is being served. Raises ServingError (with `.status`).

    The answer's `id` is the request's, or a new one when it has none (or an empty one); the observers on `stats`
    are told that same id, before this returns (so feedback sent after the answer finds it).
    """
    start = time.perf_counter()
    served: LoadedModel | None = None
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
        result = holder.infer(name, version, request.inputs, request.outputs, raw=not request.preprocessed)
        request_id = request.id or uuid.uuid4().hex
        data = json.dumps(encode_infer_response(result, request_id, request), separators=(",", ":")).encode()
    except ServingError as e:
        ms = (time.perf_counter() - start) * 1000.0
        target = served if served is not None and (name is None or name == served.name) else None
        if e.status >= 500 and not isinstance(e, ModelNotReady):  # the model's failure, not the client's
            stats.record_error(model=target, ms=ms)
            log.warning("inference on %s failed: %s", name, e)
        else:
            stats.record_rejected(model=target, ms=ms)
            if isinstance(e, BatchTooLarge):
                log.info("refused an inference request: %s", e)
        raise
    except Exception:
        ms = (time.perf_counter() - start) * 1000.0
        stats.record_error(model=served if served is not None and name in (None, served.name) else None, ms=ms)
        raise
    stats.record_answer(request_id, result.model, result.inputs or request.inputs, result.all_outputs,
                        (time.perf_counter() - start) * 1000.0)
    return data


# --- labelled feedback -------------------------------------------------------------------------------------------

MAX_FEEDBACK_BYTES = 64 << 10  # a label is a number or a short list: anything longer is refused unread (413)
FEEDBACK_RESULTS = ("accepted", "unknown", "expired", "duplicate")


@dataclass(frozen=True)
class FeedbackRequest:
    """`{"id": <an answer's id>, "label": <int | number | list of numbers>}`; `model_name` only over MQTT."""

    id: str
    label: int | float | list[int | float]
    model_name: str | None = None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_feedback(body: bytes) -> FeedbackRequest:
    """A feedback body as a FeedbackRequest; BadRequest (naming the problem) if it is not one."""
    try:
        doc = json.loads(body.decode("utf-8"), parse_constant=_no_constants)
    except UnicodeDecodeError as e:
        raise BadRequest(f"feedback body is not valid UTF-8 (byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise BadRequest(f"feedback body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    except (ValueError, RecursionError) as e:  # NaN/Infinity, huge integers, deep nesting
        raise BadRequest(f"feedback body is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise BadRequest(f"feedback body must be a JSON object, got {_json_type(doc)}")
    req_id = doc.get("id")
    if not isinstance(req_id, str) or not req_id:
        what = "missing" if req_id is None else f"{_json_type(req_id)}" if not isinstance(req_id, str) else "empty"
        raise BadRequest(f"feedback needs 'id': the id of the answer it labels (a non-empty string; got {what})")
    if "label" not in doc:
        raise BadRequest("feedback needs 'label': a class index, a value, or a list of numbers")
    label = doc["label"]
    if isinstance(label, list):
        if not label or not all(_number(v) for v in label):
            raise BadRequest("'label' as a list must be a non-empty list of finite numbers")
    elif not _number(label):
        raise BadRequest(f"'label' must be an integer, a number or a list of numbers, got {_json_type(label)}")
    model_name = doc.get("model_name")
    if model_name is not None and not isinstance(model_name, str):
        raise BadRequest(f"'model_name' must be a string, got {_json_type(model_name)}")
    return FeedbackRequest(id=req_id, label=label, model_name=model_name)


def run_feedback(sink: FeedbackSink, body: bytes, name: str | None = None,
                 served: LoadedModel | None = None) -> bytes:
    """Hand one feedback body to `sink`; the answer `{"id", "result"}` (result: one of FEEDBACK_RESULTS).

    `name` comes from the URL; None takes the body's `model_name`, else the served model's name (MQTT). Unknown and
    expired ids are answers, not errors. BadRequest for a malformed body or a label the sink refuses (ValueError):
    the sink is not called, or changed nothing. A body over MAX_FEEDBACK_BYTES is the caller's to refuse (413).
    """
    request = parse_feedback(body)
    if name is None:
        name = request.model_name or (served.name if served is not None else "")
    try:
        result = sink.feedback(name, request.id, request.label)
    except ValueError as e:
        raise BadRequest(f"'label' does not fit the prediction of {request.id!r}: {e}") from e
    if result not in FEEDBACK_RESULTS:
        raise InferenceFailed(f"feedback sink answered {result!r}, not one of {FEEDBACK_RESULTS}")
    return json.dumps({"id": request.id, "result": result}, separators=(",", ":")).encode()
