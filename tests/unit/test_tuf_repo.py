"""The packager's TUF repository: layout, keys, signing, versions, chunk lists, atomic commits."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from packager import tuf_repo
from packager.errors import RepoError
from packager.tuf_repo import Expiry


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    tuf_repo.init_repo(r)
    return r


def _md(repo: Path, name: str) -> Metadata:
    return Metadata.from_bytes((repo / "metadata" / name).read_bytes())


def _versions(repo: Path) -> dict[str, int]:
    ts = _md(repo, "timestamp.json").signed
    assert isinstance(ts, Timestamp)
    snap = _md(repo, f"{ts.snapshot_meta.version}.snapshot.json").signed
    assert isinstance(snap, Snapshot)
    return {"timestamp": ts.version, "snapshot": snap.version, "targets": snap.meta["targets.json"].version}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_init_layout_keys_and_signatures(tmp_path: Path, repo: Path) -> None:
    mdir = repo / "metadata"
    assert sorted(p.name for p in mdir.iterdir()) == [
        "1.root.json", "1.snapshot.json", "1.targets.json", "timestamp.json"]
    assert (repo / "root.json").read_bytes() == (mdir / "1.root.json").read_bytes()
    assert tuf_repo.provisioning_root(repo) == repo / "root.json"

    root_md = _md(repo, "1.root.json")
    root = root_md.signed
    assert isinstance(root, Root)
    assert root.consistent_snapshot is True
    assert len(root.roles["root"].keyids) == 3 and root.roles["root"].threshold == 2
    for role in ("targets", "snapshot", "timestamp"):
        assert len(root.roles[role].keyids) == 1
        root.verify_delegate(role, _md(repo, f"1.{role}.json" if role != "timestamp" else "timestamp.json")
                             .signed_bytes, _md(repo, f"1.{role}.json" if role != "timestamp"
                                                else "timestamp.json").signatures)
    root.verify_delegate("root", root_md.signed_bytes, root_md.signatures)
    assert len(root_md.signatures) == 3

    now = datetime.now(UTC)
    assert abs(root.expires - (now + timedelta(days=365))) < timedelta(minutes=1)
    assert abs(_md(repo, "timestamp.json").signed.expires - (now + timedelta(days=1))) < timedelta(minutes=1)

    root_keys = tmp_path / "repo-root-keys"  # default: beside the repository, meant to go offline
    key_files = [*root_keys.glob("*.pem"), *(repo / "keys").glob("*.pem")]
    assert len(key_files) == 6
    for f in key_files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert f.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")  # PKCS#8 PEM, passphrase
    assert stat.S_IMODE(root_keys.stat().st_mode) == 0o700
    assert stat.S_IMODE((repo / "keys").stat().st_mode) == 0o700


def test_init_refuses_to_overwrite(repo: Path, tmp_path: Path) -> None:
    before = (repo / "metadata" / "1.root.json").read_bytes()
    with pytest.raises(RepoError, match="already holds a TUF repository"):
        tuf_repo.init_repo(repo)
    with pytest.raises(RepoError, match="already holds keys"):
        tuf_repo.init_repo(tmp_path / "other", root_key_dir=tmp_path / "repo-root-keys")
    assert (repo / "metadata" / "1.root.json").read_bytes() == before


def test_init_validates_threshold(tmp_path: Path) -> None:
    with pytest.raises(RepoError, match="threshold"):
        tuf_repo.init_repo(tmp_path / "r", root_keys=2, root_threshold=3)


def test_custom_expiry_is_kept_for_later_signing(tmp_path: Path) -> None:
    r = tmp_path / "r"
    tuf_repo.init_repo(r, root_key_dir=tmp_path / "rk", expiry=Expiry(timestamp=timedelta(hours=2)))
    now = datetime(2030, 1, 1, tzinfo=UTC)
    tuf_repo.refresh(r, now=now)
    assert _md(r, "timestamp.json").signed.expires == now + timedelta(hours=2)


def test_add_targets_copies_files_and_signs_chunk_list(repo: Path, tmp_path: Path) -> None:
    bundle = _write(tmp_path / "digits-1.bundle", os.urandom(2 * 1000 + 500))
    doc = _write(tmp_path / "lab.json", b'{"group": "lab"}')
    tfs = tuf_repo.add_targets(repo, [
        ("bundles/digits-1.bundle", bundle, {"name": "digits", "version": 1}),
        ("deployments/lab.json", doc, {}),
    ], chunk_size=1000)
    assert _versions(repo) == {"timestamp": 2, "snapshot": 2, "targets": 2}  # one bump for both

    data = bundle.read_bytes()
    tf = tfs[0]
    sha = hashlib.sha256(data).hexdigest()
    assert tf.length == len(data) and tf.hashes == {"sha256": sha}
    assert tf.custom == {"name": "digits", "version": 1, "chunk_size": 1000,
                         "chunks": [hashlib.sha256(data[i:i + 1000]).hexdigest() for i in (0, 1000, 2000)]}
    stored = repo / "targets" / f"{sha}.digits-1.bundle"
    assert stored.read_bytes() == data
    assert tuf_repo.target_file_path(repo, tf) == stored

    refs = tuf_repo.referenced_targets(repo)
    assert set(refs) == {"bundles/digits-1.bundle", "deployments/lab.json"}
    assert refs["bundles/digits-1.bundle"] == tf  # what was signed is what was returned
    assert refs["deployments/lab.json"].custom["chunks"] == [hashlib.sha256(doc.read_bytes()).hexdigest()]


def test_default_chunk_size_and_empty_file(repo: Path, tmp_path: Path) -> None:
    big = _write(tmp_path / "b.bundle", os.urandom(128 * 1024 + 1))
    empty = _write(tmp_path / "e.json", b"")
    tfs = tuf_repo.add_targets(repo, [("bundles/b.bundle", big, {}), ("deployments/e.json", empty, {})])
    assert tfs[0].custom["chunk_size"] == 128 * 1024 and len(tfs[0].custom["chunks"]) == 2
    assert tfs[1].custom["chunks"] == []


def test_meta_hashes_chain_timestamp_to_snapshot_to_targets(repo: Path, tmp_path: Path) -> None:
    tuf_repo.add_target(repo, "bundles/a-1.bundle", _write(tmp_path / "a", b"a" * 10), {})
    files = tuf_repo.current_metadata(repo)
    assert sorted(files) == ["1.root.json", "2.snapshot.json", "2.targets.json", "timestamp.json"]
    ts = Metadata.from_bytes(files["timestamp.json"]).signed
    snap = Metadata.from_bytes(files["2.snapshot.json"]).signed
    assert isinstance(ts, Timestamp) and isinstance(snap, Snapshot)
    ts.snapshot_meta.verify_length_and_hashes(files["2.snapshot.json"])
    snap.meta["targets.json"].verify_length_and_hashes(files["2.targets.json"])


def test_add_rejects_bad_input(repo: Path, tmp_path: Path) -> None:
    f = _write(tmp_path / "x", b"x")
    for bad in ("../x", "/abs", "bundles/../x", "bundles//x", "a b", "bundles/x\n"):
        with pytest.raises(RepoError, match="invalid target path"):
            tuf_repo.add_target(repo, bad, f, {})
    with pytest.raises(RepoError, match="chunk size"):
        tuf_repo.add_target(repo, "bundles/x", f, {}, chunk_size=128 * 1024 + 1)
    with pytest.raises(RepoError, match="cannot add target"):
        tuf_repo.add_target(repo, "bundles/x", tmp_path / "missing", {})
    assert _versions(repo) == {"timestamp": 1, "snapshot": 1, "targets": 1}


def test_remove_target_bumps_and_keeps_the_file(repo: Path, tmp_path: Path) -> None:
    tf = tuf_repo.add_target(repo, "bundles/a-1.bundle", _write(tmp_path / "a", b"a"), {})
    tuf_repo.remove_target(repo, "bundles/a-1.bundle")
    assert tuf_repo.referenced_targets(repo) == {}
    assert _versions(repo) == {"timestamp": 3, "snapshot": 3, "targets": 3}
    assert (repo / "targets" / f"{tf.hashes['sha256']}.a-1.bundle").exists()
    with pytest.raises(RepoError, match="is not a target"):
        tuf_repo.remove_target(repo, "bundles/a-1.bundle")


def test_refresh_resigns_timestamp_and_snapshot_when_due(repo: Path) -> None:
    t0 = datetime.now(UTC)
    assert tuf_repo.refresh(repo, now=t0) == ["timestamp.json"]
    assert _versions(repo) == {"timestamp": 2, "snapshot": 1, "targets": 1}
    assert tuf_repo.refresh(repo, force_snapshot=True, now=t0) == ["2.snapshot.json", "timestamp.json"]
    # Four days on, the 7-day snapshot has less than half its period left.
    assert tuf_repo.refresh(repo, now=t0 + timedelta(days=4)) == ["3.snapshot.json", "timestamp.json"]
    # 50 days on, targets (90 days) is due too.
    assert tuf_repo.refresh(repo, now=t0 + timedelta(days=50)) == [
        "2.targets.json", "4.snapshot.json", "timestamp.json"]
    assert _md(repo, "timestamp.json").signed.expires == (t0 + timedelta(days=51)).replace(microsecond=0)


def test_rotate_root_keys_signed_by_old_and_new(repo: Path, tmp_path: Path) -> None:
    root_keys = tmp_path / "repo-root-keys"
    old_files = sorted(p.name for p in root_keys.glob("*.pem"))
    tuf_repo.rotate_keys(repo, "root")
    v1 = _md(repo, "1.root.json").signed
    v2_md = _md(repo, "2.root.json")
    v2 = v2_md.signed
    assert isinstance(v1, Root) and isinstance(v2, Root)
    result = v2.get_root_verification_result(v1, v2_md.signed_bytes, v2_md.signatures)
    assert result.first.verified and result.second.verified  # old threshold and new threshold both signed
    assert not set(v1.roles["root"].keyids) & set(v2.roles["root"].keyids)
    assert v2.roles["root"].threshold == 2 and len(v2.roles["root"].keyids) == 3
    assert (repo / "root.json").read_bytes() == (repo / "metadata" / "2.root.json").read_bytes()
    # Old keys are kept aside, not deleted; new ones are private.
    assert sorted(p.name for p in (root_keys / "retired").glob("*.pem")) == old_files
    for f in root_keys.glob("*.pem"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert sorted(n for n in tuf_repo.current_metadata(repo) if n.endswith("root.json")) == [
        "1.root.json", "2.root.json"]
    tuf_repo.rotate_keys(repo, "root")  # the new keys work for the next rotation
    assert _md(repo, "3.root.json").signed.version == 3


@pytest.mark.parametrize("role", ["targets", "snapshot", "timestamp"])
def test_rotate_online_key_resigns_role(repo: Path, role: str) -> None:
    old_keyid = _md(repo, "1.root.json").signed.roles[role].keyids[0]
    before = _versions(repo)
    tuf_repo.rotate_keys(repo, role)
    root = _md(repo, "2.root.json").signed
    assert isinstance(root, Root)
    (new_keyid,) = root.roles[role].keyids
    assert new_keyid != old_keyid and old_keyid not in root.keys
    after = _versions(repo)
    bumped = {"targets": {"targets", "snapshot", "timestamp"}, "snapshot": {"snapshot", "timestamp"},
              "timestamp": {"timestamp"}}[role]
    assert {r for r in after if after[r] != before[r]} == bumped
    name = "timestamp.json" if role == "timestamp" else f"{after[role]}.{role}.json"
    md = _md(repo, name)
    assert list(md.signatures) == [new_keyid]
    root.verify_delegate(role, md.signed_bytes, md.signatures)
    assert any(p.name.startswith(role) for p in (repo / "keys" / "retired").glob("*.pem"))
    tuf_repo.refresh(repo)  # later signing finds the new key


def test_rotate_needs_root_threshold(repo: Path, tmp_path: Path) -> None:
    root_keys = tmp_path / "repo-root-keys"
    for p in sorted(root_keys.glob("*.pem"))[:2]:
        p.unlink()  # one of three left, threshold is two
    with pytest.raises(RepoError, match="root needs 2 of its keys"):
        tuf_repo.rotate_keys(repo, "timestamp")
    assert not (repo / "metadata" / "2.root.json").exists()
    with pytest.raises(RepoError, match="unknown role"):
        tuf_repo.rotate_keys(repo, "mirror")


def test_missing_or_corrupt_repository(tmp_path: Path, repo: Path) -> None:
    with pytest.raises(RepoError, match="no TUF repository"):
        tuf_repo.refresh(tmp_path / "nowhere")
    with pytest.raises(RepoError, match="no TUF repository"):
        tuf_repo.current_metadata(tmp_path / "nowhere")
    for key in (repo / "keys").glob("timestamp-*.pem"):
        key.unlink()
    with pytest.raises(RepoError, match="timestamp needs 1 of its keys"):
        tuf_repo.refresh(repo)
    (repo / "metadata" / "1.snapshot.json").write_bytes(b"{not json")
    with pytest.raises(RepoError, match=r"1\.snapshot\.json is not valid TUF metadata"):
        tuf_repo.referenced_targets(repo)


def test_tampered_metadata_is_not_resigned(repo: Path) -> None:
    path = repo / "metadata" / "1.targets.json"
    d = json.loads(path.read_bytes())
    d["signed"]["targets"]["bundles/evil.bundle"] = {"length": 1, "hashes": {"sha256": "0" * 64}}
    path.write_bytes(json.dumps(d).encode())
    with pytest.raises(RepoError, match="corrupt repository"):
        tuf_repo.refresh(repo)


def test_commit_is_atomic(repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while writing leaves the previous state intact and visible, and no temp files behind."""
    before = tuf_repo.current_metadata(repo)
    real_replace = os.replace
    calls: list[str] = []

    def failing_replace(src: str, dst: str) -> None:
        calls.append(str(dst))
        if str(dst).endswith(".snapshot.json"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(tuf_repo.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space"):
        tuf_repo.add_target(repo, "bundles/a-1.bundle", _write(tmp_path / "a", b"abc"), {})
    monkeypatch.undo()
    assert any(c.endswith("2.targets.json") for c in calls)  # targets was written first ...
    assert not any(c.endswith("timestamp.json") for c in calls)  # ... timestamp, the commit point, never
    assert tuf_repo.current_metadata(repo) == before
    leftovers = [p for p in repo.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    tuf_repo.add_target(repo, "bundles/a-1.bundle", tmp_path / "a", {})  # the next commit simply succeeds
    assert _versions(repo) == {"timestamp": 2, "snapshot": 2, "targets": 2}
    assert isinstance(_md(repo, "2.targets.json").signed, Targets)
