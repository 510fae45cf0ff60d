"""`packager publish / refresh / unpublish`: the TUF repository on disk, pushed to the broker (and a mirror).

The repository decides what is signed (`packager/tuf_repo.py`); this module decides what a command adds to it
and pushes the result (`packager/mqtt_publish.py`). Pushing is idempotent, so rerunning a command after a crash
or a cut connection finishes the job without resending what the broker already holds intact.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuf.api.metadata import TargetFile

from agent.bundle import Manifest, sha256_file, verify_bundle
from agent.transport.mqtt import MqttClient, split_broker_urls
from agent.transport.topics import ID_RULE, Topics, is_id
from agent.trust.confidential import Encryption
from packager import confidential, tuf_repo
from packager.errors import InputError, RepoError
from packager.mqtt_publish import PublishStats, TargetSpec, delete_targets, publish_tree, write_http_tree

log = logging.getLogger(__name__)

CHUNK_SIZE = 128 * 1024
Progress = Callable[[str, int, int], None]


def check_level_name(label: str, value: str) -> str:
    """`value` if it is a valid fleet, group or device name, else InputError naming `label` (`--fleet`, `--group`):
    the rule agent/config.py applies to `[agent] fleet`, `group` and `device_id` (agent/ids.py). Any other name
    could never reach a device."""
    if not is_id(value):
        raise InputError(f"{label} {value!r}: use {ID_RULE}, as a device's [agent] config does")
    return value


def check_broker_url(url: str) -> None:
    """InputError unless `url` is mqtt[s]://HOST[:PORT], or several comma-separated (the client fails over between
    them), before anything is signed or connected."""
    try:
        split_broker_urls(url)
    except ValueError as e:
        raise InputError(f"--broker: {e}") from e


def topics_for(fleet: str) -> Topics:
    return Topics(f"edgeship/{check_level_name('--fleet', fleet)}/")


GRANTS_DIR = "grants/"


def bundle_target_path(name: str, version: int) -> str:
    return f"bundles/{name}-{version}.bundle"


def deployment_target_path(group: str) -> str:
    return f"deployments/{group}.json"


@dataclass(frozen=True)
class ShadowSpec:
    """A bundle a group runs in shadow beside what it serves (never answering a caller from it)."""

    bundle: str  # its target path, `bundles/<name>-<version>.bundle`
    name: str
    version: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "name": self.name, "version": self.version, "sha256": self.sha256}


def deployment_document(group: str, target_path: str, name: str, version: int, sha256: str,
                        shadow: ShadowSpec | None = None, rollout: Mapping[str, Any] | None = None) -> bytes:
    """What a group should run (and, optionally, run in shadow). Signed as a TUF target, so a device trusts it like
    the bundle itself. Agents that predate shadow mode read only the keys they know and ignore `shadow`.
    `rollout` (packager/rollout, docs/rollouts.md): which devices of the group follow `bundle`, the others
    `rollout.previous`."""
    doc: dict[str, Any] = {"group": group, "bundle": target_path, "name": name, "version": version, "sha256": sha256}
    if shadow is not None:
        doc["shadow"] = shadow.to_json()
    if rollout is not None:
        doc["rollout"] = dict(rollout)
    return json.dumps(doc, sort_keys=True).encode() + b"\n"


@dataclass(frozen=True)
class PublishResult:
    bundle_target: str
    deployment_target: str | None  # None: signed for nobody (a rollout deploys it)
    sha256: str
    timestamp_version: int
    added: tuple[str, ...]  # target paths newly signed by this run (empty on a rerun)
    stats: PublishStats | None
    http_files: int
    shadow_target: str | None = None  # the shadow bundle's target path, when the deployment names one


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
    """Push the current metadata and `targets` to the broker (if any) and the mirror tree (if any). Every signed
    grants document of an encrypted bundle goes too (idempotent: chunks already there are skipped), so metadata
    never reaches devices ahead of a grant it signs, whichever command re-signed it (`packager device add` signs
    grants for a new device without pushing; the next publish, refresh or `device grant` delivers them)."""
    metadata = tuf_repo.current_metadata(repo)
    paths = {tf.path for tf in targets}
    grants = [tf for path, tf in tuf_repo.referenced_targets(repo).items()
              if path.startswith(GRANTS_DIR) and path not in paths]
    specs = _specs(repo, [*targets, *grants])
    version = _timestamp_version(metadata)
    stats = publish_tree(client, topics, metadata, specs, progress, notify_version=version) if client else None
    http_files = write_http_tree(http_dir, metadata, specs) if http_dir is not None else 0
    return stats, http_files, version


def _bundle_custom(manifest: Manifest) -> dict[str, Any]:
    return {
        "name": manifest.name, "version": manifest.version, "task": manifest.task,
        "formats": [a.format for a in manifest.artifacts],
        "runtimes": sorted({a.runtime for a in manifest.artifacts}),
        "arch": list(manifest.target.get("arch", [])), "min_ram_mb": manifest.target.get("min_ram_mb"),
    }


def _bundle_item(bundle: Path, manifest: Manifest, existing: dict[str, TargetFile],
                 items: list[tuple[str, Path, dict[str, Any]]], crypt: _Encrypting | None = None) -> tuple[str, str]:
    """(target path, sha256) of `bundle`; queues it in `items` unless the repository already signs it. Encrypted
    (`crypt.encrypt`, or signed encrypted already), the sha256 is the ciphertext's."""
    path = bundle_target_path(manifest.name, manifest.version)
    digest = sha256_file(bundle)
    signed_enc = Encryption.from_custom(dict(existing[path].custom), path) if path in existing else None
    if crypt is not None and (signed_enc is not None or (crypt.encrypt and path not in existing)):
        return _encrypted_item(path, digest, bundle, manifest, existing, items, signed_enc, crypt)
    if crypt is not None and crypt.encrypt:
        raise InputError(f"{path} is already published unencrypted: --encrypt cannot hide it now; build a new "
                         "version")
    if crypt is not None and crypt.group is not None and not crypt.no_encrypt:
        confidential.check_plaintext_allowed(crypt.repo, crypt.group, path, "publish it with --encrypt, or with "
                                             "--no-encrypt to send it (and later bundles) to the group in plaintext")
    if path in existing:
        if existing[path].hashes.get("sha256") != digest:
            raise InputError(f"{path} is already published with different content: bundles are immutable, "
                             "build a new version")
    elif all(p != path for p, _, _ in items):
        items.append((path, bundle, _bundle_custom(manifest)))
    return path, digest


@dataclass
class _Encrypting:
    """What `--encrypt` needs while a publish signs: the repository, the group granted, the open temporary files."""

    repo: Path
    group: str | None
    encrypt: bool  # encrypt bundles not signed yet (an already encrypted one stays encrypted either way)
    no_encrypt: bool  # plaintext to a group that took encrypted bundles is what the operator asked for
    files: ExitStack
    grants: list[str]  # grants targets to push


def _encrypted_item(path: str, digest: str, bundle: Path, manifest: Manifest, existing: dict[str, TargetFile],
                    items: list[tuple[str, Path, dict[str, Any]]], signed: Encryption | None,
                    crypt: _Encrypting) -> tuple[str, str]:
    """An encrypted bundle stays encrypted: a publish of the same bundle (a rerun, another group) extends its
    grants to the group instead of encrypting again."""
    if signed is not None:
        if signed.plaintext.sha256 != digest:
            raise InputError(f"{path} is already published with different content: bundles are immutable, "
                             "build a new version")
        if crypt.group is not None:
            confidential.group_recipients(crypt.repo, crypt.group)
            confidential.extend_grants(crypt.repo, existing[path], signed, groups=[crypt.group])
        crypt.grants.append(signed.grants)  # pushed again: idempotent, and a rerun finishes a cut push
        return path, existing[path].hashes["sha256"]
    assert crypt.group is not None
    if all(p != path for p, _, _ in items):
        enc = crypt.files.enter_context(confidential.encrypt_bundle(
            crypt.repo, bundle, path, manifest, _bundle_custom(manifest), [crypt.group]))
        items.append((path, enc.ciphertext, enc.custom))
        items.append((enc.grants_target, enc.grants_file, enc.grants_custom))
        crypt.grants.append(enc.grants_target)
    return path, sha256_file(next(f for p, f, _ in items if p == path))


def check_shadow_compatible(serving: Manifest, shadow: Manifest) -> None:
    """InputError unless `shadow` can run on the serving model's live inputs and be compared with its outputs."""
    if (shadow.name, shadow.version) == (serving.name, serving.version):
        raise InputError(f"--shadow: {shadow.name} v{shadow.version} is the bundle being published; shadow another")
    if shadow.task != serving.task:
        raise InputError(f"--shadow: {shadow.name} v{shadow.version} is a {shadow.task} model, "
                         f"{serving.name} v{serving.version} a {serving.task} one: their answers cannot be compared")
    theirs = {s.name for s in shadow.inputs}
    ours = {s.name for s in serving.inputs}
    if theirs != ours:
        raise InputError(f"--shadow: {shadow.name} v{shadow.version} takes inputs {sorted(theirs)}, "
                         f"{serving.name} v{serving.version} takes {sorted(ours)}: it could not run on live inputs")


def sign_bundle(repo: Path, bundle: Path, group: str | None, shadow: Path | None = None,
                encrypt: bool = False, no_encrypt: bool = False) -> tuple[list[TargetFile], tuple[str, ...], str]:
    """Add the bundle (and the `shadow` bundle, if any) and the group's deployment document as targets, unless the
    repository already has them. The document is rewritten whole: publishing without `shadow` ends a shadow.
    Without `group` only the bundle is signed: it is deployed to nobody until a rollout names it.
    `encrypt`: the bundles are signed encrypted, granted to the group's active devices (packager/confidential.py),
    and the group takes only encrypted bundles from then on: a bundle not encrypted is refused for it unless
    `no_encrypt` (which records that the group takes plaintext again).

    Returns the TargetFiles to push (bundle, deployment, then the shadow bundle, then grants documents), the target
    paths newly added, and the bundle's sha256 (the ciphertext's when encrypted).
    """
    with ExitStack() as files:
        crypt = _Encrypting(repo, group, encrypt, no_encrypt, files, [])
        if encrypt and no_encrypt:
            raise InputError("--encrypt and --no-encrypt contradict each other: give one")
        if encrypt and group is None:
            raise InputError("--encrypt needs --group: the bundle is granted to that group's devices")
        if encrypt and group is not None:
            check_level_name("--group", group)
            confidential.group_recipients(repo, group)  # before anything is encrypted or signed
        targets, added, digest = _sign_bundle(repo, bundle, group, shadow, crypt)
        if no_encrypt and group is not None:
            confidential.set_group_confidential(repo, group, False)
        if crypt.grants:
            signed = tuf_repo.referenced_targets(repo)
            targets += [signed[p] for p in dict.fromkeys(crypt.grants)]
        return targets, added, digest


def _sign_bundle(repo: Path, bundle: Path, group: str | None, shadow: Path | None,
                 crypt: _Encrypting) -> tuple[list[TargetFile], tuple[str, ...], str]:
    if group is not None:
        check_level_name("--group", group)
    elif shadow is not None:
        raise InputError("--shadow needs --group: a shadow runs on a group's devices")
    manifest = verify_bundle(bundle).manifest  # never sign something a device would refuse
    shadow_manifest = verify_bundle(shadow).manifest if shadow is not None else None
    if shadow_manifest is not None:
        check_shadow_compatible(manifest, shadow_manifest)
    existing = tuf_repo.referenced_targets(repo)
    items: list[tuple[str, Path, dict[str, Any]]] = []
    bundle_path, digest = _bundle_item(bundle, manifest, existing, items, crypt)
    if group is None:
        if items:
            tuf_repo.add_targets(repo, items, chunk_size=CHUNK_SIZE)
        return [tuf_repo.referenced_targets(repo)[bundle_path]], tuple(p for p, _, _ in items), digest
    dep_path = deployment_target_path(group)
    spec: ShadowSpec | None = None
    if shadow is not None and shadow_manifest is not None:
        shadow_path, shadow_digest = _bundle_item(shadow, shadow_manifest, existing, items, crypt)
        spec = ShadowSpec(shadow_path, shadow_manifest.name, shadow_manifest.version, shadow_digest)
    with tempfile.TemporaryDirectory(prefix="edgeship-publish-") as tmp:
        doc = Path(tmp) / f"{group}.json"
        doc.write_bytes(deployment_document(group, bundle_path, manifest.name, manifest.version, digest, spec))
        current = existing.get(dep_path)
        if current is None or current.hashes.get("sha256") != sha256_file(doc):
            custom: dict[str, Any] = {"group": group, "name": manifest.name, "version": manifest.version}
            if spec is not None:  # so `unpublish` refuses to drop a bundle a group still shadows
                custom["shadow"] = {"name": spec.name, "version": spec.version}
            items.append((dep_path, doc, custom))
        if items:
            tuf_repo.add_targets(repo, items, chunk_size=CHUNK_SIZE)
    signed = tuf_repo.referenced_targets(repo)
    targets = [signed[bundle_path], signed[dep_path]] + ([signed[spec.bundle]] if spec is not None else [])
    return targets, tuple(p for p, _, _ in items), digest


def current_deployment(repo: Path, group: str) -> dict[str, Any] | None:
    """The group's signed deployment document as the repository holds it, or None when nothing is deployed."""
    tf = tuf_repo.referenced_targets(repo).get(deployment_target_path(check_level_name("--group", group)))
    if tf is None:
        return None
    try:
        doc = json.loads(tuf_repo.target_file_path(repo, tf).read_bytes())
    except (OSError, ValueError) as e:
        raise InputError(f"{tf.path} in {repo} cannot be read: {e}") from e
    if not isinstance(doc, dict):
        raise InputError(f"{tf.path} in {repo} is not a deployment document")
    return doc


def check_deployable(repo: Path, group: str, bundle_target: str, no_encrypt: bool) -> None:
    """Before a rollout: InputError when `bundle_target` is not encrypted and `group` takes only encrypted bundles,
    unless `no_encrypt` (then the group takes plaintext from now on)."""
    tf = tuf_repo.referenced_targets(repo).get(bundle_target)
    if tf is None or Encryption.from_custom(dict(tf.custom), bundle_target) is not None:
        return
    if no_encrypt:
        confidential.set_group_confidential(repo, group, False)
    else:
        confidential.check_plaintext_allowed(repo, group, bundle_target, "roll out an encrypted version, or pass "
                                             "--no-encrypt to send it (and later bundles) to the group in plaintext")


def sign_deployment(repo: Path, group: str, bundle_target: str, rollout: Mapping[str, Any] | None
                    ) -> list[TargetFile]:
    """Sign `deployments/<group>.json` naming the already signed `bundle_target`, with a `rollout` entry (or
    none). Returns [the bundle's TargetFile, the document's] to push, and the bundle's grants document when it is
    encrypted (granted to the group's devices first). A bundle not encrypted for a group that takes only encrypted
    ones is refused (check_deployable's `no_encrypt` lifts that)."""
    check_level_name("--group", group)
    signed = tuf_repo.referenced_targets(repo)
    tf = signed.get(bundle_target)
    if tf is None:
        raise InputError(f"{bundle_target} is not signed in {repo}: `packager publish` it first")
    enc = Encryption.from_custom(dict(tf.custom), bundle_target)
    if enc is None:
        check_deployable(repo, group, bundle_target, no_encrypt=False)
    if enc is not None:  # a rollout of an encrypted bundle to a group it was not published for
        confidential.group_recipients(repo, group)
        confidential.extend_grants(repo, tf, enc, groups=[group])
    custom_b = dict(tf.custom)
    name, version, digest = str(custom_b["name"]), int(custom_b["version"]), tf.hashes["sha256"]
    dep_path = deployment_target_path(group)
    with tempfile.TemporaryDirectory(prefix="edgeship-deploy-") as tmp:
        doc = Path(tmp) / f"{group}.json"
        doc.write_bytes(deployment_document(group, bundle_target, name, version, digest, rollout=rollout))
        current = signed.get(dep_path)
        if current is None or current.hashes.get("sha256") != sha256_file(doc):
            custom: dict[str, Any] = {"group": group, "name": name, "version": version}
            previous = (rollout or {}).get("previous")
            if isinstance(previous, Mapping):  # so `unpublish` refuses to drop what the group may go back to
                custom["previous"] = {"name": previous.get("name"), "version": previous.get("version")}
            tuf_repo.add_targets(repo, [(dep_path, doc, custom)], chunk_size=CHUNK_SIZE)
    signed = tuf_repo.referenced_targets(repo)
    return [signed[bundle_target], signed[dep_path]] + ([signed[enc.grants]] if enc is not None else [])


def deploy(repo: Path, group: str, bundle_target: str, rollout: Mapping[str, Any] | None,
           client: MqttClient | None, topics: Topics, http_dir: Path | None = None) -> int:
    """`sign_deployment` and push it (with the bundle, idempotently); returns the timestamp version."""
    targets = sign_deployment(repo, group, bundle_target, rollout)
    _, _, version = push(repo, client, topics, targets, http_dir)
    return version


def publish(repo: Path, bundle: Path, group: str | None, client: MqttClient | None, topics: Topics,
            http_dir: Path | None, progress: Progress | None = None, shadow: Path | None = None,
            encrypt: bool = False, no_encrypt: bool = False) -> PublishResult:
    targets, added, digest = sign_bundle(repo, bundle, group, shadow, encrypt, no_encrypt)
    stats, http_files, version = push(repo, client, topics, targets, http_dir, progress)
    shadow_target = next((t.path for t in targets[2:] if t.path.startswith("bundles/")), None)
    return PublishResult(targets[0].path, targets[1].path if group is not None else None, digest, version, added,
                         stats, http_files, shadow_target)


def grant(repo: Path, device_id: str, client: MqttClient | None, topics: Topics,
          http_dir: Path | None) -> tuple[list[str], int]:
    """Grant every encrypted bundle of the device's group to the (newly added) device and push the re-signed
    grants documents; the ciphertexts are not touched. Returns the grants target paths changed and the timestamp
    version. A bundle that could not be granted is RepoError, after the others were granted and pushed."""
    granted = confidential.grant_device(repo, device_id)
    signed = tuf_repo.referenced_targets(repo)
    _, _, version = push(repo, client, topics, [signed[p] for p in granted.changed], http_dir)
    if granted.failed:
        raise RepoError(f"device {device_id}: pushed {len(granted.changed)} grant(s) (timestamp v{version}) but not "
                        f"granted {describe_failures(granted.failed)}: fix that and rerun `packager device grant "
                        f"{device_id}`")
    return granted.changed, version


def describe_failures(failed: Mapping[str, str]) -> str:
    return "; ".join(f"{path} ({why})" for path, why in failed.items())


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
                 and ref in (f"{tf.custom.get('name')}-{tf.custom.get('version')}", _previous_ref(tf))]
        if users:
            raise InputError(f"{ref} is what {', '.join(users)} deploys: publish another bundle for that group first")
        shadows = [p for p, tf in signed.items() if p.startswith("deployments/") and _shadow_ref(tf) == ref]
        if shadows:
            raise InputError(f"{ref} is what {', '.join(shadows)} runs in shadow: publish that group's bundle "
                             "without --shadow (or with another) first")
        tuf_repo.remove_target(repo, path)
        removed.append(path)
        enc = Encryption.from_custom(dict(signed[path].custom), path)
        if enc is not None:
            if enc.grants in signed:
                tuf_repo.remove_target(repo, enc.grants)  # its chunks go with the garbage below
            custom = dict(signed[path].custom)
            confidential.forget_content_key(repo, str(custom["name"]), int(custom["version"]))
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


def _previous_ref(tf: TargetFile) -> str | None:
    previous = dict(tf.custom).get("previous")  # a rollout's previous version: devices may go back to it
    return f"{previous.get('name')}-{previous.get('version')}" if isinstance(previous, dict) else None


def _shadow_ref(tf: TargetFile) -> str | None:
    shadow = dict(tf.custom).get("shadow")
    return f"{shadow.get('name')}-{shadow.get('version')}" if isinstance(shadow, dict) else None


def _remove_mirror_copy(http_dir: Path, sha: str) -> None:
    chunk_dir = http_dir / "targets" / sha
    if chunk_dir.is_dir():
        for p in chunk_dir.iterdir():
            p.unlink()
        chunk_dir.rmdir()
    for p in (http_dir / "targets").glob(f"*/{sha}.*"):
        p.unlink()
