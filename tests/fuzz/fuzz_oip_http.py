"""Fuzz the OIP request parser as the HTTP server uses it: a POST /v2/models/<name>/infer body.

`parse_infer_request` with the model's batch limit: an accepted request decodes to tensors of the declared
datatypes whose element counts match their shapes, with no batch over the limit, and the shapes the early scan
(`declared_batches`) reads are the ones the full parse reads. Then `run_infer` answers it with the served model
(tests/fuzz/served.py: real preprocessing and classification): only a ServingError may come out (the HTTP server
answers anything else 500 and logs a traceback: a defect), and an answer is a JSON OIP response.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np

from agent.errors import ServingError
from agent.serve.holder import DATATYPES
from agent.serve.oip import MAX_CLASSIFICATION, declared_batches, parse_infer_request, run_infer
from tests.fuzz.common import check
from tests.fuzz.served import MANIFEST, holder

_HOLDER, _STATS = holder()
_LIMIT = MANIFEST.max_batch


def check_request(data: bytes, limit: int | None) -> None:
    try:
        request = parse_infer_request(data, limit, MANIFEST.name)
    except ServingError:
        return
    check(request.id is None or isinstance(request.id, str), "id")
    for v in (request.model_name, request.model_version):
        check(v is None or isinstance(v, str), "model_name/model_version")
    check(request.classification is None or 1 <= request.classification <= MAX_CLASSIFICATION, "classification")
    check(all(1 <= k <= MAX_CLASSIFICATION for k in (request.classify or {}).values()), "outputs classification")
    dtypes = {np.dtype(v) for v in DATATYPES.values()}
    declared = declared_batches(data)
    for name, arr in request.inputs.items():
        check(arr.dtype in dtypes, f"{name}: dtype {arr.dtype}")
        check(arr.size == math.prod(arr.shape), f"{name}: {arr.size} elements for shape {arr.shape}")
        check(arr.size <= len(data), f"{name}: {arr.size} elements from a {len(data)}-byte body")
        check(limit is None or arr.ndim == 0 or arr.shape[0] <= limit, f"{name}: batch {arr.shape} over {limit}")
        if arr.dtype.kind == "f":
            check(bool(np.isfinite(arr).all()), f"{name}: non-finite values accepted")
        if declared is not None and name in declared:
            check(tuple(declared[name]) == arr.shape, f"{name}: scanned shape {declared[name]}, parsed {arr.shape}")


def test_one_input(data: bytes) -> None:
    check_request(data, _LIMIT)
    try:
        answer = run_infer(_HOLDER, _STATS, data, MANIFEST.name, None)
    except ServingError:
        return
    doc = json.loads(answer)
    check(isinstance(doc.get("outputs"), list) and doc["model_name"] == MANIFEST.name, f"answer {answer[:200]!r}")


def main() -> None:
    from tests.fuzz.runner import fuzz

    fuzz("oip_http", sys.argv)


if __name__ == "__main__":
    main()
