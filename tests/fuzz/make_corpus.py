"""Writes the seed corpus of every fuzz harness into tests/fuzz/corpus/<harness>/ (`python -m tests.fuzz.make_corpus
[NAME ...]`): small, real inputs (a tiny bundle written by the bundle writer, its manifest, OIP request bodies, agent
configs, chunk plans, and TUF metadata signed by a throwaway repository). Seeds are named `seed-*`; rerunning
rewrites them and leaves the fuzzer's own finds (libFuzzer names them by their sha1) and `crash-*` regressions alone.

The TUF seeds need the throwaway repository's root: it is written to tests/fuzz/tuf_fixture/ with the canonical
`signed` digests of every genuinely signed file (what fuzz_tuf accepts as trusted), so the two are made together.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from agent.bundle import Artifact, Manifest, TensorSpec, write_bundle
from agent.trust.chunks import chunk_hashes
from tests.fuzz.runner import CORPUS, HARNESSES

FIXTURE = Path(__file__).parent / "tuf_fixture"


def _write(name: str, seeds: dict[str, bytes]) -> None:
    d = CORPUS / name
    d.mkdir(parents=True, exist_ok=True)
    for old in d.glob("seed-*"):
        old.unlink()
    for key, data in seeds.items():
        (d / f"seed-{key}").write_bytes(data)


def manifest(**overrides: object) -> Manifest:
    image = TensorSpec("image", (-1, 3, 8, 8), "float32")
    meta = TensorSpec("meta", (-1, 2), "int64")
    logits = TensorSpec("logits", (-1, 4), "float32")
    art = Artifact("onnx", "model.onnx", (image, meta), (logits,), {"name": "static"}, 97.5, 0.3, 0.1, 0.2)
    q_in = TensorSpec("image", (-1, 3, 8, 8), "float32", 0.05, -3, "int8")
    lite = Artifact("tflite", "model.tflite", (q_in, meta), (logits,), {"name": "full-int8"}, 97.1, 0.7, 0.1, 0.3)
    fields: dict[str, object] = dict(
        name="digits", version=3, task="classification", created="2026-11-29T00:00:00+00:00",
        inputs=(image, meta), outputs=(logits,), artifacts=(art, lite), metric="top1", fp32_metric_value=97.8,
        max_drop=1.0, parity={"kind": "top1", "min_agreement": 0.97}, latency_budget_ms=5.0,
        target={"arch": ["x86_64"]}, provenance={"source_sha256": "0" * 64}, max_batch=8,
        preprocessing={"input": "image", "layout": "NHWC", "model_layout": "NCHW", "scale": 0.00392156862745098,
                       "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resize": "bilinear",
                       "dtype": "uint8"},
    )
    fields.update(overrides)
    from agent.bundle import Labels

    fields.setdefault("labels", Labels("logits", ("cat", "dog", "bird", "fish")))
    return Manifest(**fields)  # type: ignore[arg-type]


def bundle_seeds() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "model.onnx").write_bytes(b"\x08\x07onnx" * 40)
        (t / "model.tflite").write_bytes(b"TFL3" * 30)
        (t / "golden.npz").write_bytes(b"PK\x05\x06" + bytes(18))
        members = {"model.onnx": t / "model.onnx", "model.tflite": t / "model.tflite", "golden.npz": t / "golden.npz"}
        write_bundle(t / "b.bundle", manifest(), members)
        full = (t / "b.bundle").read_bytes()
        out["two-artifacts"] = b"\x00" + full
        out["two-artifacts-fixsum"] = b"\x01" + full
        write_bundle(t / "c.bundle", manifest(artifacts=manifest().artifacts[:1], labels=None, preprocessing={}),
                     {"model.onnx": t / "model.onnx"})
        out["one-member-fixsum"] = b"\x01" + (t / "c.bundle").read_bytes()
    return out


def manifest_seeds() -> dict[str, bytes]:
    plain = manifest(artifacts=manifest().artifacts[:1], labels=None, preprocessing={"note": "none"})
    files = {"model.onnx": _entry(b"m"), "model.tflite": _entry(b"t"), "golden.npz": _entry(b"g")}
    return {"full": manifest().with_files(files).to_bytes(),
            "plain": plain.with_files({"model.onnx": _entry(b"m")}).to_bytes()}


def _entry(data: bytes) -> object:
    from agent.bundle import FileEntry

    return FileEntry(hashlib.sha256(data).hexdigest(), len(data))


def _infer(inputs: list[dict[str, object]], **extra: object) -> bytes:
    return json.dumps({"id": "req-1", "inputs": inputs, **extra}).encode()


def _image(n: int, h: int, w: int) -> dict[str, object]:
    return {"name": "image", "datatype": "UINT8", "shape": [n, h, w, 3], "data": [(i * 7) % 256 for i in
                                                                                range(n * h * w * 3)]}


def _meta(n: int) -> dict[str, object]:
    return {"name": "meta", "datatype": "INT64", "shape": [n, 2], "data": list(range(n * 2))}


def oip_http_seeds() -> dict[str, bytes]:
    return {
        "raw-image": _infer([_image(1, 4, 5), _meta(1)]),
        "classification": _infer([_image(2, 3, 3), _meta(2)], parameters={"classification": 2},
                                 outputs=[{"name": "logits", "parameters": {"classification": 3}}]),
        "preprocessed": _infer([{"name": "image", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [[[[0.5] * 8] * 8]
                                                                                                    * 3]}, _meta(1)],
                               parameters={"preprocessed": True}, model_name="digits", model_version="3"),
        "bool-fp16": _infer([{"name": "flags", "datatype": "BOOL", "shape": [2], "data": [True, False]},
                             {"name": "half", "datatype": "FP16", "shape": [1, 2], "data": [1.5, -2.0]}]),
        "long-data": _infer([{"name": "image", "datatype": "UINT8", "shape": [1, 64, 128, 3],
                              "data": [[[[1, 2, 3]] * 128] * 64]}, _meta(1)]),
    }


def oip_mqtt_seeds() -> dict[str, bytes]:
    # byte 0 picks the handler: even = inference request, odd = feedback
    seeds = {f"infer-{k}": b"\x00" + v for k, v in oip_http_seeds().items() if k != "long-data"}
    seeds["feedback-index"] = b"\x01" + json.dumps({"id": "req-1", "label": 2, "model_name": "digits"}).encode()
    seeds["feedback-list"] = b"\x01" + json.dumps({"id": "req-1", "label": [0.1, 0.2, 0.3, 0.4]}).encode()
    # bit 1: a response topic follows (one length byte, then the topic)
    for key, topic in (("own-subtopic", "edgeship/lab/devices/cam-7/infer/response/app1"), ("outside", "app/answers"),
                       ("other-device", "edgeship/lab/devices/cam-8/infer/response"), ("tuf", "edgeship/lab/tuf/x"),
                       ("wildcard", "app/+/x")):
        raw = topic.encode()
        seeds[f"topic-{key}"] = b"\x02" + bytes([len(raw)]) + raw + seeds["infer-raw-image"][1:]
    seeds["topic-feedback"] = b"\x03" + bytes([11]) + b"app/answers" + seeds["feedback-index"][1:]
    return seeds


def chunk_seeds() -> dict[str, bytes]:
    """fuzz_chunks reads `>IIB` length, chunk_size, flags, the target, then `>HH` index, size arrivals (its
    docstring): the target's real chunks, out of order, one twice, one cut short, one resumed from disk."""
    out = {}
    for key, size, chunk in (("three", 700, 256), ("exact", 512, 256), ("one", 10, 64), ("empty", 0, 16)):
        data = bytes((i * 31) % 251 for i in range(size))
        pieces = [data[i:i + chunk] for i in range(0, size, chunk)]
        order = [*reversed(range(len(pieces))), 0] if pieces else []
        arrivals = b"".join(struct.pack(">HH", i, len(pieces[i])) + pieces[i] for i in order)
        out[key] = struct.pack(">IIB", size, chunk, 0) + data + arrivals
        if pieces:
            short = struct.pack(">HH", 0, len(pieces[0]) - 1) + pieces[0][:-1]
            resumed = struct.pack(">HH", len(pieces), 1) + b"x" + data[: len(data) // 2]  # past the end, then disk
            out[key + "-resume"] = struct.pack(">IIB", size, chunk, 0b001) + data + short + arrivals[:0] + resumed
            out[key + "-stale"] = struct.pack(">IIB", size, chunk, 0b010) + data + arrivals
    data = bytes(range(100))
    plan = {"sha256": hashlib.sha256(data).hexdigest(), "length": 100, "chunk_size": 64,
            "chunks": chunk_hashes(data, 64)}
    out["json-plan"] = (struct.pack(">IIB", 0, 0, 0b100) + json.dumps(plan).encode() + b"\n"
                        + struct.pack(">HH", 1, 36) + data[64:] + struct.pack(">HH", 0, 64) + data[:64])
    return out


CONFIGS = {
    "minimal": b'[agent]\ndevice_id = "dev-1"\nstate_dir = "/var/lib/edge-agent"\n[trust]\nroot = "root.json"\n',
    "full": b"""[agent]
device_id = "cam-07"
state_dir = "state"
fleet = "lab"
group = "north"

[mqtt]
urls = ["mqtts://broker-a.example:8883", "mqtts://broker-b.example:8883?subscribe_qos=0"]
topic_prefix = "edgeship/lab/"
ca_file = "ca.pem"
connect_timeout_s = 5.0
receive_window = 8
retained_grace_s = 0.25

[trust]
root = "root.json"

[mirror]
http = "https://mirror.example/repo/"

[serve]
http = "0.0.0.0:8501"
max_batch = 16

[limits]
max_bundle_bytes = 104857600
max_metadata_bytes = 65536
chunk_timeout_s = 10.0

[deploy]
poll_interval_s = 60.0
probation_s = 30.0
probation_requests = 100
max_error_rate = 0.05
keep = 3
threads = 2

[telemetry]
interval_s = 5.0
metrics = false
home_assistant = true
drift_window = 1000
""",
    "env": b'[agent]\ndevice_id = "d"\nstate_dir = "s"\n[trust]\nroot = "r"\n'
           b"#ENV\nEDGESHIP_MQTT_URL=mqtt://10.0.0.2:1884\nEDGESHIP_SERVE_MAX_BATCH=4\nEDGESHIP_TELEMETRY_METRICS=no\n",
}


def tuf_seeds() -> dict[str, bytes]:
    """A throwaway repository (root 100 years, online roles 50 years: the seeds stay valid) with a bundle target and
    a deployment document; the fixture keeps its root and the digests of everything it signed."""
    from tests.fuzz.fuzz_tuf import SEPARATOR, canonical_signed_digest

    os.environ.setdefault("EDGESHIP_KEY_PASSPHRASE", "fuzz-corpus-throwaway")
    from packager import tuf_repo

    years = timedelta(days=365)
    expiry = tuf_repo.Expiry(root=100 * years, targets=50 * years, snapshot=50 * years, timestamp=50 * years)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        repo = t / "repo"
        tuf_repo.init_repo(repo, root_key_dir=t / "root-keys", root_keys=1, root_threshold=1, expiry=expiry)
        root = tuf_repo.provisioning_root(repo).read_bytes()
        target = t / "digits-3.bundle"
        target.write_bytes(bytes(range(256)) * 3)
        doc = t / "lab.json"
        doc.write_bytes(b'{"group": "lab", "bundle": "bundles/digits-3.bundle", "name": "digits", "version": 3}')
        genuine: dict[str, list[str]] = {"root": [], "timestamp": [], "snapshot": [], "targets": []}
        versions = []
        for step in range(2):  # two consecutive versions of the online metadata: a newer and an older one
            if step == 0:
                tuf_repo.add_targets(repo, [("bundles/digits-3.bundle", target, {"name": "digits", "version": 3}),
                                            ("deployments/lab.json", doc, {})])
            else:
                tuf_repo.refresh(repo, force_snapshot=True)
            current = tuf_repo.current_metadata(repo)
            versions.append(current)
            for name, data in current.items():
                role = name.split(".")[-2]
                genuine[role].append(canonical_signed_digest(data))
        FIXTURE.mkdir(exist_ok=True)
        (FIXTURE / "root.json").write_bytes(root)
        (FIXTURE / "genuine.json").write_text(
            json.dumps({role: sorted(set(v)) for role, v in genuine.items()}, indent=1) + "\n")
        payload = target.read_bytes()

    def pick(current: dict[str, bytes], role: str) -> bytes:
        return next(v for k, v in current.items() if k.split(".")[-2] == role)

    def seed(current: dict[str, bytes], *, root2: bytes = b"", with_target: bool = True) -> bytes:
        parts = [root2, pick(current, "timestamp"), pick(current, "snapshot"), pick(current, "targets"),
                 payload if with_target else b""]
        return SEPARATOR.join(parts)

    return {"genuine-v2": seed(versions[1]), "genuine-v1": seed(versions[0]),
            "mixed": SEPARATOR.join([b"", pick(versions[1], "timestamp"), pick(versions[0], "snapshot"),
                                     pick(versions[1], "targets"), payload[:100]]),
            "root-rotation-unsigned": seed(versions[1], root2=_bumped(root)),
            # python-tuf reads "...z" as "...Z" and re-encodes it: the signature still verifies, and the device keeps
            # the bytes as received (found by the fuzzer; canonical_signed_digest compares what is signed)
            "expires-lowercase-z": seed(versions[1]).replace(b'Z","meta"', b'z","meta"', 1)}


def _bumped(root: bytes) -> bytes:
    """The root as version 2, still carrying version 1's signatures (which no longer verify)."""
    doc = json.loads(root)
    doc["signed"]["version"] = 2
    return json.dumps(doc).encode()


GENERATORS: dict[str, Callable[[], dict[str, bytes]]] = {
    "bundle": bundle_seeds, "manifest": manifest_seeds, "oip_http": oip_http_seeds, "oip_mqtt": oip_mqtt_seeds,
    "chunks": chunk_seeds, "config": lambda: dict(CONFIGS), "tuf": tuf_seeds,
}
assert set(GENERATORS) == set(HARNESSES)


def main() -> None:
    for name in sys.argv[1:] or HARNESSES:
        seeds = GENERATORS[name]()
        _write(name, seeds)
        print(f"{name}: {len(seeds)} seeds, {sum(map(len, seeds.values()))} bytes")


if __name__ == "__main__":
    main()
