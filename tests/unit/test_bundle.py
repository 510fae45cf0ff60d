"""The bundle format: round trip, and every way a hostile or damaged bundle is refused."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from agent import bundle
from agent.bundle import DEFAULT_MAX_BATCH, Artifact, FileEntry, Manifest, TensorSpec, verify_bundle, write_bundle
from agent.errors import BundleRejected


def make_manifest(**overrides: object) -> Manifest:
    spec_in = TensorSpec("x", (-1, 1, 8, 8), "float32")
    spec_out = TensorSpec("logits", (-1, 10), "float32")
    art = Artifact("onnx", "model.int8.onnx", (spec_in,), (spec_out,), {"name": "static"}, 97.5, 0.3, 0.1, 0.2)
    fields: dict[str, object] = dict(
        name="digits", version=3, task="classification", created="2026-11-29T00:00:00+00:00",
        inputs=(spec_in,), outputs=(spec_out,), artifacts=(art,), metric="top1", fp32_metric_value=97.8,
        max_drop=1.0, parity={"kind": "top1", "min_agreement": 0.97}, latency_budget_ms=5.0,
        target={"arch": ["x86_64"]}, preprocessing={}, provenance={"source_sha256": "0" * 64},
    )
    fields.update(overrides)
    return Manifest(**fields)  # type: ignore[arg-type]


@pytest.fixture()
def members(tmp_path: Path) -> dict[str, Path]:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"\x08\x07" * 5000)
    golden = tmp_path / "golden.npz"
    golden.write_bytes(b"golden-bytes")
    return {"model.int8.onnx": model, "golden.npz": golden}


def test_round_trip_and_extract(tmp_path: Path, members: dict[str, Path]) -> None:
    out = tmp_path / "digits-3.bundle"
    written = write_bundle(out, make_manifest(), members)
    assert set(written.files) == {"model.int8.onnx", "golden.npz"}
    with tarfile.open(out) as tar:
        assert tar.getnames()[0] == "manifest.json"
    dest = tmp_path / "unpacked"
    verified = verify_bundle(out, dest=dest)
    assert verified.manifest == written
    assert (dest / "model.int8.onnx").read_bytes() == members["model.int8.onnx"].read_bytes()
    assert verified.manifest.artifact("onnx").inputs[0].shape == (-1, 1, 8, 8)


def test_bundles_are_reproducible(tmp_path: Path, members: dict[str, Path]) -> None:
    a, b = tmp_path / "a.bundle", tmp_path / "b.bundle"
    write_bundle(a, make_manifest(), members)
    write_bundle(b, make_manifest(), members)
    assert a.read_bytes() == b.read_bytes()


def _tar(path: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _rewrite(src: Path, dst: Path, change: dict[str, bytes], extra: list[tuple[tarfile.TarInfo, bytes | None]]
             ) -> Path:
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = []
    with tarfile.open(src) as tar:
        for info in tar:
            f = tar.extractfile(info)
            assert f is not None
            data = change.get(info.name, f.read())
            entries.append(_file(info.name, data))
    return _tar(dst, entries + extra)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        ("tamper_member", "hash_mismatch"),
        ("traversal", "unsafe_path"),
        ("absolute", "unsafe_path"),
        ("symlink", "unsafe_path"),
        ("unlisted", "unlisted"),
        ("truncated_member", "size_mismatch"),
        ("manifest_not_first", "format"),
        ("bad_manifest_json", "manifest"),
        ("manifest_bad_version", "manifest"),
        ("manifest_traversal_file", "manifest"),
    ],
)
def test_hostile_bundles_are_rejected(tmp_path: Path, members: dict[str, Path], mutate: str, reason: str) -> None:
    good = tmp_path / "good.bundle"
    write_bundle(good, make_manifest(), members)
    bad = tmp_path / "bad.bundle"
    manifest = json.loads(verify_bundle(good).manifest.to_bytes())
    if mutate == "tamper_member":
        _rewrite(good, bad, {"golden.npz": b"golden-bytez"}, [])
    elif mutate == "traversal":
        _rewrite(good, bad, {}, [_file("../evil.sh", b"x")])
    elif mutate == "absolute":
        _rewrite(good, bad, {}, [_file("/etc/evil", b"x")])
    elif mutate == "symlink":
        link = tarfile.TarInfo("golden2.npz")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        _rewrite(good, bad, {}, [(link, None)])
    elif mutate == "unlisted":
        _rewrite(good, bad, {}, [_file("extra.bin", b"x")])
    elif mutate == "truncated_member":
        _rewrite(good, bad, {"golden.npz": b"golden"}, [])
    elif mutate == "manifest_not_first":
        _tar(bad, [_file("golden.npz", b"golden-bytes"), _file("manifest.json", json.dumps(manifest).encode())])
    elif mutate == "bad_manifest_json":
        _rewrite(good, bad, {"manifest.json": b"{not json"}, [])
    elif mutate == "manifest_bad_version":
        manifest["version"] = -1
        _rewrite(good, bad, {"manifest.json": json.dumps(manifest).encode()}, [])
    elif mutate == "manifest_traversal_file":
        manifest["files"]["../x"] = manifest["files"].pop("golden.npz")
        _rewrite(good, bad, {"manifest.json": json.dumps(manifest).encode()}, [])
    dest = tmp_path / "dest"
    with pytest.raises(BundleRejected) as info:
        verify_bundle(bad, dest=dest)
    assert info.value.reason == reason
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_size_limit_and_missing_file(tmp_path: Path, members: dict[str, Path]) -> None:
    out = tmp_path / "b.bundle"
    write_bundle(out, make_manifest(), members)
    with pytest.raises(BundleRejected) as info:
        verify_bundle(out, max_bytes=100)
    assert info.value.reason == "too_large"
    with pytest.raises(BundleRejected) as info:
        verify_bundle(tmp_path / "nope.bundle")
    assert info.value.reason == "unreadable"
    not_tar = tmp_path / "text.bundle"
    not_tar.write_text("hello")
    with pytest.raises(BundleRejected) as info:
        verify_bundle(not_tar)
    assert info.value.reason == "format"


def test_failed_write_leaves_nothing(tmp_path: Path, members: dict[str, Path]) -> None:
    members = dict(members, **{"missing.bin": tmp_path / "does-not-exist"})
    out = tmp_path / "x.bundle"
    with pytest.raises(FileNotFoundError):
        write_bundle(out, make_manifest(), members)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["golden.npz", "m.onnx"]


def test_unsafe_member_name_refused_on_write(tmp_path: Path, members: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="unsafe"):
        write_bundle(tmp_path / "x.bundle", make_manifest(), {"../m": members["golden.npz"]})


def test_extract_refuses_an_existing_destination(tmp_path: Path, members: dict[str, Path]) -> None:
    out = tmp_path / "b.bundle"
    write_bundle(out, make_manifest(), members)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(FileExistsError):
        verify_bundle(out, dest=dest)
    assert list(dest.iterdir()) == []


def _with_manifest(tmp_path: Path, members: dict[str, Path], edit: object) -> Path:
    """A bundle whose manifest.json went through `edit(dict)` after a valid write (hashes stay right)."""
    good = tmp_path / "good.bundle"
    write_bundle(good, make_manifest(), members)
    manifest = json.loads(verify_bundle(good).manifest.to_bytes())
    edit(manifest)  # type: ignore[operator]
    return _rewrite(good, tmp_path / "edited.bundle", {"manifest.json": json.dumps(manifest).encode()}, [])


def test_max_batch_round_trips_and_defaults_to_64(tmp_path: Path, members: dict[str, Path]) -> None:
    out = tmp_path / "b.bundle"
    written = write_bundle(out, make_manifest(max_batch=8), members)
    assert written.max_batch == 8
    assert verify_bundle(out).manifest.max_batch == 8
    assert make_manifest().max_batch == DEFAULT_MAX_BATCH == 64
    # a manifest written before the field existed reads as the default
    older = _with_manifest(tmp_path, members, lambda m: m.pop("max_batch"))
    assert verify_bundle(older).manifest.max_batch == 64


@pytest.mark.parametrize("value", [0, -1, 65537, 2**40, True, 1.5, "8", None])
def test_max_batch_out_of_range_is_refused(tmp_path: Path, members: dict[str, Path], value: object) -> None:
    bad = _with_manifest(tmp_path, members, lambda m: m.update(max_batch=value))
    with pytest.raises(BundleRejected) as info:
        verify_bundle(bad)
    assert info.value.reason == "manifest"
    assert "max_batch" in str(info.value)


# --- tar records that are not plain regular files (issue 7 item 2) -------------------------------------------
# Each hostile bundle below is self-consistent: its manifest lists the member with the size and sha256 that
# tarfile's own (sparse, long-name, pax) reading produces, so only refusing the record itself stops it.

SPARSE_SIZE = 4 << 20  # declared expanded size, far beyond the ~20 KB the bundle file holds
PAYLOAD = b"golden-bytes"


def _sparse_map_block(pairs: list[tuple[int, int]]) -> bytes:
    text = f"{len(pairs)}\n" + "".join(f"{o}\n{n}\n" for o, n in pairs)
    return text.encode().ljust(512, b"\0")


def _gnu_sparse_header(name: str, stored: int, realsize: int, region: tuple[int, int]) -> bytes:
    """A GNU 'S' header: one sparse region, the member expanding to `realsize` bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.type = stored, tarfile.GNUTYPE_SPARSE
    buf = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    buf[386:398] = b"%011o\0" % region[0]
    buf[398:410] = b"%011o\0" % region[1]
    buf[483:495] = b"%011o\0" % realsize
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf)


def _hostile_member(kind: str) -> tuple[str, bytes]:
    """(name the manifest lists, raw tar bytes of that one member) for each kind of non-plain record."""
    out = io.BytesIO()
    name = "golden.npz"
    if kind == "gnu_sparse":
        out.write(_gnu_sparse_header(name, len(PAYLOAD), SPARSE_SIZE, (512, len(PAYLOAD))))
        out.write(PAYLOAD.ljust(512, b"\0"))
        return name, out.getvalue()
    fmt = tarfile.GNU_FORMAT if kind in ("gnu_longname", "gnu_longlink") else tarfile.PAX_FORMAT
    data = PAYLOAD
    info = tarfile.TarInfo(name)
    if kind == "pax_sparse_1_0":
        info.name = "GNUSparseFile.0/golden.npz"
        info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name,
                            "GNU.sparse.realsize": str(SPARSE_SIZE)}
        data = _sparse_map_block([(0, len(PAYLOAD))]) + PAYLOAD
    elif kind == "pax_sparse_0_1":
        info.pax_headers = {"GNU.sparse.size": str(SPARSE_SIZE), "GNU.sparse.map": f"0,{len(PAYLOAD)}"}
    elif kind == "pax_sparse_0_0":
        info.pax_headers = {"GNU.sparse.size": str(SPARSE_SIZE), "GNU.sparse.numblocks": "1",
                            "GNU.sparse.offset": "0", "GNU.sparse.numbytes": str(len(PAYLOAD))}
    elif kind == "gnu_longname":
        name = info.name = "g" * 110
    elif kind == "gnu_longlink":
        info.linkname = "l" * 110  # a regular file with a 'K' record before it
    elif kind == "pax_path":
        info.name = "decoy.bin"  # the ustar name; the pax header renames it
        info.pax_headers = {"path": name}
    elif kind == "pax_size":
        info.pax_headers = {"size": str(len(PAYLOAD))}
    elif kind == "pax_mtime":
        info.pax_headers = {"mtime": "1"}
    else:
        raise AssertionError(kind)
    info.size = len(data)
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        tar.addfile(info, io.BytesIO(data))
        end = tar.offset  # the member's records and data, without the end-of-archive blocks
    return name, out.getvalue()[:end]


def _hostile_bundle(tmp_path: Path, kind: str, global_pax: bool = False) -> Path:
    """A bundle: manifest.json, then the hostile member, whose size and sha256 the manifest lists as tarfile
    reads them."""
    name, member = _hostile_member(kind)

    def build(size: int, digest: str) -> bytes:
        manifest = make_manifest().with_files({name: FileEntry(digest, size)})
        manifest = replace(manifest, artifacts=(replace(manifest.artifacts[0], file=name),))
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT,
                          pax_headers={"comment": "x"} if global_pax else None) as tar:
            body = manifest.to_bytes()
            tar.addfile(_file("manifest.json", body)[0], io.BytesIO(body))
            end = tar.offset
        return out.getvalue()[:end] + member + b"\0" * 1024

    # what tarfile would make of the member: its size and sha256 after sparse/long-name/pax processing
    with tarfile.open(fileobj=io.BytesIO(build(0, "0" * 64))) as tar:
        info = tar.getmembers()[1]
        f = tar.extractfile(info)
        assert f is not None and info.name == name
        digest = hashlib.sha256(f.read()).hexdigest()
        size = info.size
    path = tmp_path / f"{kind}.bundle"
    path.write_bytes(build(size, digest))
    return path


HOSTILE_KINDS = ["gnu_sparse", "pax_sparse_0_0", "pax_sparse_0_1", "pax_sparse_1_0", "gnu_longname",
                 "gnu_longlink", "pax_path", "pax_size", "pax_mtime"]


@pytest.mark.parametrize("kind", HOSTILE_KINDS)
def test_hostile_bundles_are_what_the_old_reader_trusted(tmp_path: Path, kind: str) -> None:
    """The crafted bundles are real: tarfile reads each member under the manifest's name, size and hash."""
    path = _hostile_bundle(tmp_path, kind)
    with tarfile.open(path) as tar:
        names = tar.getnames()
        info = tar.getmembers()[1]
    assert names[0] == "manifest.json" and len(names) == 2
    assert info.isreg()
    if kind.startswith(("gnu_sparse", "pax_sparse")):
        assert info.size == SPARSE_SIZE > path.stat().st_size


@pytest.mark.parametrize("kind", HOSTILE_KINDS)
def test_non_plain_members_are_refused_and_nothing_is_written(tmp_path: Path, kind: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = _hostile_bundle(tmp_path, kind)
    written: list[int] = []
    remove_tree = bundle._remove_tree

    def record(staging: Path) -> None:  # what extraction wrote, just before the failed staging dir goes
        written.append(sum(p.stat().st_size for p in staging.iterdir()))
        remove_tree(staging)

    monkeypatch.setattr(bundle, "_remove_tree", record)
    dest = tmp_path / "dest"
    with pytest.raises(BundleRejected) as info:
        verify_bundle(path, dest=dest, max_bytes=1 << 20)
    assert info.value.reason == "unsafe_member", str(info.value)
    assert not dest.exists()
    assert written and max(written) <= path.stat().st_size
    with pytest.raises(BundleRejected) as info:  # inspect and publish read without extracting
        verify_bundle(path)
    assert info.value.reason == "unsafe_member"


def test_global_pax_header_is_refused(tmp_path: Path) -> None:
    path = _hostile_bundle(tmp_path, "pax_mtime", global_pax=True)
    with pytest.raises(BundleRejected) as info:
        verify_bundle(path)
    assert info.value.reason == "unsafe_member"


# --- manifest values a device must not act on (issue 7) --------------------------------------------------------


def _with_raw_manifest(tmp_path: Path, members: dict[str, Path], change: tuple[bytes, bytes] | bytes) -> Path:
    """A bundle whose manifest.json is `change` itself, or the valid manifest with one text replacement."""
    good = tmp_path / "good.bundle"
    written = write_bundle(good, make_manifest(), members)
    if isinstance(change, tuple):
        valid = written.to_bytes()
        assert valid.count(change[0]) == 1
        raw = valid.replace(*change)
    else:
        raw = change
    return _rewrite(good, tmp_path / "raw.bundle", {"manifest.json": raw}, [])


def _set(path: str, value: object) -> object:
    """An edit for _with_manifest: set the value at a /-separated path (list indexes are numbers)."""
    def edit(m: dict[str, object]) -> None:
        *parents, last = path.split("/")
        node: object = m
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]  # type: ignore[index]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value  # type: ignore[index]
    return edit


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("latency_budget_ms", float("nan")),
        ("latency_budget_ms", -5.0),
        ("latency_budget_ms", 0),
        ("latency_budget_ms", float("inf")),
        ("inputs/0/dtype", "object"),
        ("artifacts/0/outputs/0/dtype", "str"),
        ("inputs/0/shape", [-1, 10**12]),
        ("inputs/0/shape", [-1, True]),
        ("inputs/0/shape", [-2, 8]),
        ("inputs/0/shape", [1] * 17),
        ("version", 10**30),
        ("version", 2**53),
        ("version", True),
        ("files/golden.npz/bytes", True),
        ("files/golden.npz/bytes", 1 << 40),
        ("accuracy/fp32", float("nan")),
        ("artifacts/0/host_p95_ms", float("-inf")),
        ("created", {"not": "a string"}),
        ("artifacts/0/inputs/0/scale", -0.5),
        ("preprocessing", {"a": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}),
    ],
)
def test_manifest_values_out_of_bounds_are_refused(tmp_path: Path, members: dict[str, Path], field: str,
                                                   value: object) -> None:
    edits = [_set(field, value)]
    if field.startswith("artifacts/0/inputs/0/scale"):  # a complete quantization record with a bad scale
        edits += [_set("artifacts/0/inputs/0/zero_point", 0), _set("artifacts/0/inputs/0/quantized_dtype", "int8")]

    def edit(m: dict[str, object]) -> None:
        for e in edits:
            e(m)  # type: ignore[operator]

    bad = _with_manifest(tmp_path, members, edit)
    with pytest.raises(BundleRejected) as info:
        verify_bundle(bad)
    assert info.value.reason == "manifest", str(info.value)


@pytest.mark.parametrize(
    ("qdtype", "zero_point", "ok"),
    [("int8", -128, True), ("uint8", 255, True), ("int8", 128, False), ("uint8", -1, False),
     ("float32", 0, False), ("int8", True, False), ("int8", None, False)],
)
def test_quantization_records_are_checked(tmp_path: Path, members: dict[str, Path], qdtype: str,
                                          zero_point: object, ok: bool) -> None:
    edits = [_set("artifacts/0/inputs/0/scale", 0.0039), _set("artifacts/0/inputs/0/zero_point", zero_point),
             _set("artifacts/0/inputs/0/quantized_dtype", qdtype)]

    def edit(m: dict[str, object]) -> None:
        for e in edits:
            e(m)  # type: ignore[operator]

    path = _with_manifest(tmp_path, members, edit)
    if ok:
        spec = verify_bundle(path).manifest.artifact("onnx").inputs[0]
        assert (spec.scale, spec.zero_point, spec.quantized_dtype) == (0.0039, zero_point, qdtype)
    else:
        with pytest.raises(BundleRejected) as info:
            verify_bundle(path)
        assert info.value.reason == "manifest"


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", id="nested-200000"),
        pytest.param((b'"version": 3', b'"version": 1' + b"0" * 5000), id="int-5000-digits"),
        pytest.param((b'"version": 3', b'"version": 3, "version": 4'), id="duplicate-key"),
        pytest.param((b'"latency_budget_ms": 5.0', b'"latency_budget_ms": Infinity'), id="infinity"),
        pytest.param((b'"latency_budget_ms": 5.0', b'"latency_budget_ms": 1e400'), id="overflow-to-inf"),
        pytest.param((b'"golden.npz"', b'"golden\xff.npz"'), id="not-utf8"),
    ],
)
def test_manifest_json_that_breaks_the_parser_is_refused(tmp_path: Path, members: dict[str, Path],
                                                         raw: tuple[bytes, bytes] | bytes) -> None:
    bad = _with_raw_manifest(tmp_path, members, raw)
    with pytest.raises(BundleRejected) as info:
        verify_bundle(bad)
    assert info.value.reason == "manifest", str(info.value)


def test_real_values_at_the_bounds_are_accepted(tmp_path: Path, members: dict[str, Path]) -> None:
    def edit(m: dict[str, object]) -> None:
        m["version"] = 2**53 - 1
        m["inputs"] = [{"name": "ids", "shape": [-1, 2**31], "dtype": "int64"},
                       {"name": "mask", "shape": [-1, 0], "dtype": "bool"}]
        m["latency_budget_ms"] = 0.001

    manifest = verify_bundle(_with_manifest(tmp_path, members, edit)).manifest
    assert manifest.version == 2**53 - 1
    assert [i.dtype for i in manifest.inputs] == ["int64", "bool"]


def test_a_bundle_of_too_many_members_is_refused_before_its_manifest(tmp_path: Path,
                                                                    members: dict[str, Path]) -> None:
    # the reader keeps every header before writing anything: their number is bounded
    good = tmp_path / "good.bundle"
    write_bundle(good, make_manifest(), members)
    bad = _rewrite(good, tmp_path / "many.bundle", {}, [_file(f"m{i}", b"") for i in range(bundle.MAX_MEMBERS)])
    with pytest.raises(BundleRejected) as info:
        verify_bundle(bad, dest=tmp_path / "dest")
    assert info.value.reason == "too_large"
    assert not (tmp_path / "dest").exists()
