"""The bundle format: one definition, used by the packager to write and by the agent to read.

A bundle is an uncompressed tar of flat, regular files. `manifest.json` comes first and records the sha256 and
size of every other member, so a reader can bound and check each member before trusting it. Reading refuses
absolute paths, `..`, directories, links, device files, duplicate or unlisted members and sizes beyond the
manifest; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from agent.errors import BundleRejected
from agent.fsutil import fsync_dir
from agent.runtime import TensorSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20
DEFAULT_MAX_BUNDLE_BYTES = 2 << 30
# The largest batch (first dimension) one inference request may carry when the manifest does not say.
DEFAULT_MAX_BATCH = 64
MAX_BATCH_LIMIT = 65536
TASKS = ("classification", "regression", "embedding")
FORMATS = {"onnx": "onnxruntime", "tflite": "litert"}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_MEMBER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HASH_CHUNK = 1 << 20


def valid_name(name: str) -> bool:
    """Bundle names go into file names and MQTT topics: lowercase, digits, `.`, `_`, `-`."""
    return bool(_NAME_RE.match(name))


def bundle_filename(name: str, version: int) -> str:
    return f"{name}-{version}.bundle"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Artifact:
    """One runnable model file in the bundle and what the packager measured for it."""

    format: str  # "onnx" | "tflite"
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    recipe: Mapping[str, Any]
    metric_value: float
    drop: float
    host_p50_ms: float
    host_p95_ms: float

    @property
    def runtime(self) -> str:
        return FORMATS[self.format]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "runtime": self.runtime,
            "file": self.file,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "recipe": dict(self.recipe),
            "metric_value": self.metric_value,
            "drop": self.drop,
            "host_p50_ms": self.host_p50_ms,
            "host_p95_ms": self.host_p95_ms,
        }


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    task: str
    created: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    artifacts: tuple[Artifact, ...]
    metric: str
    fp32_metric_value: float
    max_drop: float
    parity: Mapping[str, Any]
    latency_budget_ms: float
    target: Mapping[str, Any]
    preprocessing: Mapping[str, Any]
    provenance: Mapping[str, Any]
    files: Mapping[str, FileEntry] = field(default_factory=dict)
    max_batch: int = DEFAULT_MAX_BATCH  # the agent answers requests with a larger first dimension 413

    def artifact(self, fmt: str) -> Artifact:
        for a in self.artifacts:
            if a.format == fmt:
                return a
        raise KeyError(fmt)

    def with_files(self, files: Mapping[str, FileEntry]) -> Manifest:
        return replace(self, files=dict(files))

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "created": self.created,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "artifacts": [a.to_json() for a in self.artifacts],
            "accuracy": {
                "metric": self.metric,
                "fp32": self.fp32_metric_value,
                "max_drop": self.max_drop,
                "int8": {a.format: {"value": a.metric_value, "drop": a.drop} for a in self.artifacts},
            },
            "parity": dict(self.parity),
            "latency_budget_ms": self.latency_budget_ms,
            "max_batch": self.max_batch,
            "target": dict(self.target),
            "preprocessing": dict(self.preprocessing),
            "provenance": dict(self.provenance),
            "files": {k: {"sha256": v.sha256, "bytes": v.bytes} for k, v in sorted(self.files.items())},
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), indent=2, sort_keys=False).encode() + b"\n"

    @classmethod
    def from_json(cls, d: Any) -> Manifest:
        """Validate and parse a manifest; any problem raises BundleRejected(reason="manifest")."""
        try:
            return _parse_manifest(d)
        except BundleRejected:
            raise
        except (KeyError, TypeError, ValueError) as e:
            detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise BundleRejected(f"invalid manifest: {detail}", reason="manifest") from e


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise BundleRejected(f"invalid manifest: {message}", reason="manifest")


def _number(v: Any, what: str) -> float:
    _require(isinstance(v, (int, float)) and not isinstance(v, bool), f"{what} must be a number")
    return float(v)


def _mapping(v: Any, what: str) -> dict[str, Any]:
    _require(isinstance(v, dict), f"{what} must be an object")
    return dict(v)


def _tensors(v: Any, what: str) -> tuple[TensorSpec, ...]:
    _require(isinstance(v, list) and len(v) > 0, f"{what} must be a non-empty list")
    return tuple(TensorSpec.from_json(_mapping(t, what)) for t in v)


def _parse_manifest(d: Any) -> Manifest:
    d = _mapping(d, "manifest")
    _require(d.get("schema") == SCHEMA_VERSION, f"unsupported schema {d.get('schema')!r}")
    name = d["name"]
    _require(isinstance(name, str) and valid_name(name), f"bad name {name!r}")
    version = d["version"]
    _require(isinstance(version, int) and not isinstance(version, bool) and version > 0,
             f"version must be a positive integer, got {version!r}")
    _require(d["task"] in TASKS, f"task must be one of {', '.join(TASKS)}")
    files_raw = _mapping(d["files"], "files")
    files: dict[str, FileEntry] = {}
    for member, entry in files_raw.items():
        _require(isinstance(member, str) and bool(_MEMBER_RE.match(member)) and member != MANIFEST,
                 f"unsafe member name {member!r}")
        e = _mapping(entry, f"files[{member}]")
        digest, size = e["sha256"], e["bytes"]
        _require(isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest) is not None,
                 f"files[{member}].sha256 is not a sha256 hex digest")
        _require(isinstance(size, int) and size >= 0, f"files[{member}].bytes must be a non-negative integer")
        files[member] = FileEntry(digest, size)
    artifacts = []
    _require(isinstance(d["artifacts"], list) and len(d["artifacts"]) > 0, "artifacts must be a non-empty list")
    for raw in d["artifacts"]:
        a = _mapping(raw, "artifact")
        _require(a["format"] in FORMATS, f"unknown artifact format {a['format']!r}")
        _require(a["file"] in files, f"artifact file {a['file']!r} is not listed in files")
        artifacts.append(Artifact(
            format=a["format"], file=a["file"],
            inputs=_tensors(a["inputs"], "artifact inputs"), outputs=_tensors(a["outputs"], "artifact outputs"),
            recipe=_mapping(a["recipe"], "recipe"), metric_value=_number(a["metric_value"], "metric_value"),
            drop=_number(a["drop"], "drop"), host_p50_ms=_number(a["host_p50_ms"], "host_p50_ms"),
            host_p95_ms=_number(a["host_p95_ms"], "host_p95_ms"),
        ))
    _require(len({a.format for a in artifacts}) == len(artifacts), "two artifacts share a format")
    acc = _mapping(d["accuracy"], "accuracy")
    max_batch = d.get("max_batch", DEFAULT_MAX_BATCH)  # optional: bundles written before it existed
    _require(isinstance(max_batch, int) and not isinstance(max_batch, bool) and 1 <= max_batch <= MAX_BATCH_LIMIT,
             f"max_batch must be an integer from 1 to {MAX_BATCH_LIMIT}, got {max_batch!r}")
    return Manifest(
        name=name, version=version, task=d["task"], created=str(d["created"]),
        inputs=_tensors(d["inputs"], "inputs"), outputs=_tensors(d["outputs"], "outputs"),
        artifacts=tuple(artifacts), metric=str(acc["metric"]),
        fp32_metric_value=_number(acc["fp32"], "accuracy.fp32"), max_drop=_number(acc["max_drop"], "max_drop"),
        parity=_mapping(d["parity"], "parity"),
        latency_budget_ms=_number(d["latency_budget_ms"], "latency_budget_ms"),
        target=_mapping(d["target"], "target"), preprocessing=_mapping(d["preprocessing"], "preprocessing"),
        provenance=_mapping(d["provenance"], "provenance"), files=files, max_batch=max_batch,
    )


# --- writing -----------------------------------------------------------------------------------------------


def write_bundle(out_path: Path, manifest: Manifest, members: Mapping[str, Path]) -> Manifest:
    """Write `out_path` atomically: the manifest (with every member's hash and size) first, then the members.

    Returns the manifest as written. On any failure nothing is left at `out_path` or beside it.
    """
    for member in members:
        if not _MEMBER_RE.match(member) or member == MANIFEST:
            raise ValueError(f"unsafe bundle member name {member!r}")
    files = {m: FileEntry(sha256_file(p), p.stat().st_size) for m, p in members.items()}
    final = manifest.with_files(files)
    manifest_bytes = final.to_bytes()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".partial", dir=out_path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_tarinfo(MANIFEST, len(manifest_bytes)), io.BytesIO(manifest_bytes))
            for member, path in sorted(members.items()):
                with path.open("rb") as f:
                    tar.addfile(_tarinfo(member, files[member].bytes), f)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
        fsync_dir(out_path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata so the same inputs give the same bytes (reproducible bundles).
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.uid, info.gid = size, 0o644, 0, 0, 0
    info.uname = info.gname = ""
    return info


# --- reading -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifiedBundle:
    path: Path
    manifest: Manifest
    bytes: int


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    for info in tar:
        name = info.name
        if name.startswith("/") or ".." in name.split("/") or "/" in name or "\\" in name:
            raise BundleRejected(f"unsafe member path {name!r} in bundle", reason="unsafe_path")
        if not info.isreg():
            raise BundleRejected(f"member {name!r} is not a regular file (links and directories are refused)",
                                 reason="unsafe_path")
        yield info


def _read_bounded(f: IO[bytes], limit: int) -> bytes:
    data = f.read(limit + 1)
    if len(data) > limit:
        raise BundleRejected(f"manifest larger than {limit} bytes", reason="too_large")
    return data


def verify_bundle(path: Path, dest: Path | None = None,
                  max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES) -> VerifiedBundle:
    """Check every member of the bundle at `path` against its manifest; with `dest`, also extract it there.

    Extraction goes to a temporary directory beside `dest` and is renamed into place only when every member
    has been checked, so `dest` is either complete and verified or absent.
    """
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BundleRejected(f"cannot read bundle {path}: {e.strerror}", reason="unreadable") from e
    if size > max_bytes:
        raise BundleRejected(f"bundle is {size} bytes, more than the limit of {max_bytes}", reason="too_large")
    staging: Path | None = None
    if dest is not None:
        if dest.exists():
            # never merge into or replace something already there: the caller picks a fresh directory
            raise FileExistsError(f"{dest} already exists")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        manifest = _verify_members(path, staging)
        if dest is not None and staging is not None:
            os.replace(staging, dest)
            staging = None
        return VerifiedBundle(path, manifest, size)
    except (tarfile.TarError, EOFError) as e:
        raise BundleRejected(f"{path.name} is not a readable bundle (tar): {e}", reason="format") from e
    finally:
        if staging is not None:
            _remove_tree(staging)


def _verify_members(path: Path, staging: Path | None) -> Manifest:
    with tarfile.open(path, mode="r:") as tar:
        members = _members(tar)
        first = next(members, None)
        if first is None or first.name != MANIFEST:
            raise BundleRejected("bundle does not start with manifest.json", reason="format")
        if first.size > MAX_MANIFEST_BYTES:
            raise BundleRejected(f"manifest larger than {MAX_MANIFEST_BYTES} bytes", reason="too_large")
        f = tar.extractfile(first)
        assert f is not None  # a regular file always has a file object
        raw_manifest = _read_bounded(f, MAX_MANIFEST_BYTES)
        try:
            manifest = Manifest.from_json(json.loads(raw_manifest))
        except json.JSONDecodeError as e:
            raise BundleRejected(f"manifest.json is not valid JSON: {e}", reason="manifest") from e
        if staging is not None:  # the unpacked release carries its (verified) manifest for later steps
            (staging / MANIFEST).write_bytes(raw_manifest)
        seen: set[str] = set()
        for info in members:
            entry = manifest.files.get(info.name)
            if entry is None:
                raise BundleRejected(f"member {info.name!r} is not listed in the manifest", reason="unlisted")
            if info.name in seen:
                raise BundleRejected(f"member {info.name!r} appears twice", reason="duplicate")
            seen.add(info.name)
            if info.size != entry.bytes:
                raise BundleRejected(f"member {info.name!r} is {info.size} bytes, manifest says {entry.bytes}",
                                     reason="size_mismatch")
            src = tar.extractfile(info)
            assert src is not None
            out = (staging / info.name).open("wb") if staging is not None else None
            h = hashlib.sha256()
            try:
                while chunk := src.read(_HASH_CHUNK):
                    h.update(chunk)
                    if out is not None:
                        out.write(chunk)
            finally:
                if out is not None:
                    out.close()
            if h.hexdigest() != entry.sha256:
                raise BundleRejected(f"member {info.name!r} does not match its sha256 in the manifest",
                                     reason="hash_mismatch")
        missing = sorted(set(manifest.files) - seen)
        if missing:
            raise BundleRejected(f"bundle lacks members listed in the manifest: {', '.join(missing)}",
                                 reason="missing_member")
        return manifest


def _remove_tree(path: Path) -> None:
    for child in path.iterdir():
        child.unlink()
    path.rmdir()
