"""`packager publish / refresh / unpublish`: the TUF repository on disk, pushed to the broker (and a mirror).

The repository decides what is signed (`packager/tuf_repo.py`); this module decides what a command adds to it
and pushes the result (`packager/mqtt_publish.py`). Pushing is idempotent, so rerunning a command after a crash
or a cut connection finishes the job without resending what the broker already holds intact.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuf.api.metadata import TargetFile

from agent.bundle import sha256_file, verify_bundle
from agent.transport.mqtt import MqttClient, parse_broker_url
from agent.transport.topics import Topics
from packager import tuf_repo
from packager.errors import InputError
from packager.mqtt_publish import PublishStats, TargetSpec, delete_targets, publish_tree, write_http_tree

log = logging.getLogger(__name__)

CHUNK_SIZE = 128 * 1024
Progress = Callable[[str, int, int], None]


# The rule agent/config.py applies to `[agent] fleet` and `group`: one topic level (no '/', no wildcards), a file
# name (`deployments/<group>.json`), bounded. Any other name could never reach a device.
_LEVEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_level_name(label: str, value: str) -> str:
    """`value` if it is a valid fleet or group name, else InputError naming `label` (`--fleet`, `--group`)."""
    if not _LEVEL_RE.match(value):
        raise InputError(f"{label} {value!r}: use letters, digits, '.', '_' and '-', starting with a letter or "
                         "digit (at most 64), as a device's [agent] config does")
    return value


def check_broker_url(url: str) -> None:
    """InputError unless `url` is mqtt[s]://HOST[:PORT], before anything is signed or connected."""
    try:
        parse_broker_url(url)
    except ValueError as e:
        raise InputError(f"--broker: {e}") from e


def topics_for(fleet: str) -> Topics:
    return Topics(f"edgeship/{check_level_name('--fleet', fleet)}/")


def bundle_target_path(name: str, version: int) -> str:
    return f"bundles/{name}-{version}.bundle"


def deployment_target_path(group: str) -> str:
    return f"deployments/{group}.json"


def deployment_document(group: str, target_path: str, name: str, version: int, sha256: str) -> bytes:
    """What a group should run. Signed as a TUF target, so a device trusts it like the bundle itself."""
    doc = {"group": group, "bundle": target_path, "name": name, "version": version, "sha256": sha256}
    return json.dumps(doc, sort_keys=True).encode() + b"\n"


@dataclass(frozen=True)
class PublishResult:
    bundle_target: str
    deployment_target: str
    sha256: str
    timestamp_version: int
    added: tuple[str, ...]  # target paths newly signed by this run (empty on a rerun)
    stats: PublishStats | None
    http_files: int


def _timestamp_version(metadata: dict[str, bytes]) -> int:
    return int(json.loads(metadata["timestamp.json"])["signed"]["version"])


def _specs(repo: Path, targets: list[TargetFile]) -> list[TargetSpec]:
    specs = []
    for tf in targets:
        custom: dict[str, Any] = dict(tf.custom)
        specs.append(TargetSpec(tf.hashes["sha256"], tuf_repo.target_file_path(repo, tf), int(custom["chunk_size"]),
                                list(custom["chunks"]), target_path=tf.path))
    return specs


def push(repo: Path, client: MqttClient | None, topics: Topics, targets: list[TargetFile],
         http_dir: Path | None, progress: Progress | None = None) -> tuple[PublishStats | None, int, int]:
    """Push the current metadata and `targets` to the broker (if any) and the mirror tree (if any)."""
    metadata = tuf_repo.current_metadata(repo)
    specs = _specs(repo, targets)
    version = _timestamp_version(metadata)
    stats = publish_tree(client, topics, metadata, specs, progress, notify_version=version) if client else None
    http_files = write_http_tree(http_dir, metadata, specs) if http_dir is not None else 0
    return stats, http_files, version


def sign_bundle(repo: Path, bundle: Path, group: str) -> tuple[list[TargetFile], tuple[str, ...], str]:
    """Add the bundle and the group's deployment document as targets, unless the repository already has them.

    Returns the two TargetFiles to push, the target paths newly added, and the bundle's sha256.
    """
    check_level_name("--group", group)
    manifest = verify_bundle(bundle).manifest  # never sign something a device would refuse
    bundle_path = bundle_target_path(manifest.name, manifest.version)
    dep_path = deployment_target_path(group)
    existing = tuf_repo.referenced_targets(repo)
    items: list[tuple[str, Path, dict[str, Any]]] = []
    digest = sha256_file(bundle)
    if bundle_path in existing:
        if existing[bundle_path].hashes.get("sha256") != digest:
            raise InputError(f"{bundle_path} is already published with different content: bundles are immutable, "
                             "build a new version")
    else:
        items.append((bundle_path, bundle, {
            "name": manifest.name, "version": manifest.version, "task": manifest.task,
            "formats": [a.format for a in manifest.artifacts],
            "runtimes": sorted({a.runtime for a in manifest.artifacts}),
            "arch": list(manifest.target.get("arch", [])), "min_ram_mb": manifest.target.get("min_ram_mb"),
        }))
    with tempfile.TemporaryDirectory(prefix="edgeship-publish-") as tmp:
        doc = Path(tmp) / f"{group}.json"
        doc.write_bytes(deployment_document(group, bundle_path, manifest.name, manifest.version, digest))
        current = existing.get(dep_path)
        if current is None or current.hashes.get("sha256") != sha256_file(doc):
            items.append((dep_path, doc, {"group": group, "name": manifest.name, "version": manifest.version}))
        if items:
            tuf_repo.add_targets(repo, items, chunk_size=CHUNK_SIZE)
    signed = tuf_repo.referenced_targets(repo)
    return [signed[bundle_path], signed[dep_path]], tuple(p for p, _, _ in items), digest


def publish(repo: Path, bundle: Path, group: str, client: MqttClient | None, topics: Topics,
            http_dir: Path | None, progress: Progress | None = None) -> PublishResult:
    targets, added, digest = sign_bundle(repo, bundle, group)
    stats, http_files, version = push(repo, client, topics, targets, http_dir, progress)
    return PublishResult(targets[0].path, targets[1].path, digest, version, added, stats, http_files)


def refresh(repo: Path, client: MqttClient | None, topics: Topics, http_dir: Path | None,
            force_snapshot: bool = False) -> tuple[list[str], int]:
    """Re-sign timestamp (and snapshot when due) and push the metadata."""
    changed = tuf_repo.refresh(repo, force_snapshot=force_snapshot)
    _, _, version = push(repo, client, topics, [], http_dir)
    return changed, version


def unreferenced_files(repo: Path) -> list[Path]:
    """Stored target files (`targets/<sha256>.<name>`) that the current targets metadata no longer lists."""
    keep = {tf.hashes["sha256"] for tf in tuf_repo.referenced_targets(repo).values()}
    return sorted(p for p in tuf_repo.targets_dir(repo).iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name.split(".", 1)[0] not in keep)


def unpublish(repo: Path, bundles: list[str], client: MqttClient | None, topics: Topics,
              http_dir: Path | None) -> tuple[list[str], list[Path]]:
    """Stop signing the named bundles (`name-version`), then delete every unreferenced target's retained chunks
    (and its mirror and repository copies). Refuses to drop a bundle a deployment document still points to."""
    signed = tuf_repo.referenced_targets(repo)
    removed = []
    for ref in bundles:
        path = f"bundles/{ref}.bundle"
        if path not in signed:
            raise InputError(f"{ref}: not a published bundle (expected NAME-VERSION, see `packager inspect`)")
        users = [p for p, tf in signed.items() if p.startswith("deployments/") and tf.custom.get("name")
                 and f"{tf.custom.get('name')}-{tf.custom.get('version')}" == ref]
        if users:
            raise InputError(f"{ref} is what {', '.join(users)} deploys: publish another bundle for that group first")
        tuf_repo.remove_target(repo, path)
        removed.append(path)
    garbage = unreferenced_files(repo)
    if removed or garbage:
        push(repo, client, topics, [], http_dir)  # devices learn the new targets list before bytes disappear
    for f in garbage:
        sha = f.name.split(".", 1)[0]
        if client is not None:
            delete_targets(client, topics, sha, math.ceil(f.stat().st_size / CHUNK_SIZE))
        if http_dir is not None:
            _remove_mirror_copy(http_dir, sha)
        f.unlink()
        log.info("garbage-collected target %s", f.name)
    return removed, garbage


def _remove_mirror_copy(http_dir: Path, sha: str) -> None:
    chunk_dir = http_dir / "targets" / sha
    if chunk_dir.is_dir():
        for p in chunk_dir.iterdir():
            p.unlink()
        chunk_dir.rmdir()
    for p in (http_dir / "targets").glob(f"*/{sha}.*"):
        p.unlink()
