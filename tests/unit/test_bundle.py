"""The bundle format: round trip, and every way a hostile or damaged bundle is refused."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from agent.bundle import DEFAULT_MAX_BATCH, Artifact, Manifest, verify_bundle, write_bundle
from agent.errors import BundleRejected
from agent.runtime import TensorSpec


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
