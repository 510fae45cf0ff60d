"""One-shot fetch: refresh trust, read this device's group deployment, download and verify its bundle.

Layout under `[agent] state_dir`:
    tuf/          trusted TUF metadata (python-tuf writes it only after verifying it)
    chunks/       verified chunks of targets still downloading (so a restart resumes)
    incoming/     a verified deployment document whose bundle is not verified yet
    deployments/  deployment documents whose bundle verified
    bundles/      verified bundles, `<name>-<version>.bundle`
    encrypted/    verified ciphertexts of encrypted bundles, until decrypted into bundles/ (then deleted)
    grants/       verified grants documents of encrypted bundles
A rejected update changes none of the trusted files: TUF keeps its metadata, and a target reaches `bundles/`
or `deployments/` only by rename after verification.

An encrypted bundle (agent/trust/confidential.py) is checked like any other target, and then: at CHECK its signed
grants document is fetched through the same TUF client, must hold an entry for this device ("not_granted"
otherwise, or when `[trust] decrypt_key_file` is not set) and that entry must open with the device's key
("key_unavailable" otherwise, as when the key file is unusable: the device's problem, never blamed on the bundle):
nothing is downloaded that the device could not decrypt. At VERIFY the ciphertext is decrypted into bundles/,
checked against the plaintext's signed sha256 and length, and then verified and unpacked like a bundle that was
never encrypted; the ciphertext is deleted then, and a later DOWNLOAD/VERIFY of the same bundle uses the plaintext
in bundles/ (checked against the same signed sha256 and length) instead of downloading it again. A full disk while
decrypting is TransportError "no_space" (the ciphertext is kept, the bundle not blamed). Plaintext never leaves the
state directory, which is made 0700 before the first byte is decrypted. grants/ keeps the latest grants document of
each encrypted bundle the device checked (small; not cleaned up), and a fetch killed mid-decryption leaves
bundles/.<name>.decrypting until the next decryption of that bundle (or the daemon's discard of it) replaces it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tuf.api.metadata import TargetFile

from agent.bundle import Manifest, sha256_file, verify_bundle
from agent.config import AgentConfig
from agent.deploy.machine import NOT_BLAMED
from agent.deploy.rollout import Membership, membership, target_for
from agent.errors import BundleRejected, ConfigError, TransportError
from agent.fsutil import fsync_dir
from agent.trust import confidential
from agent.trust.client import TrustedClient
from agent.trust.fetcher import ChunkFetcher

log = logging.getLogger(__name__)
_T = TypeVar("_T")

METADATA_URL = "mqtt:///tuf/"
TARGETS_URL = "mqtt:///targets/"


@dataclass(frozen=True)
class FetchResult:
    name: str
    version: int
    sha256: str
    path: Path
    transport: str  # "mqtt" or "http"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256, "path": str(self.path)}


def parse_deployment(data: bytes, group: str) -> tuple[str, str, int]:
    """(bundle target path, name, version) from a signed deployment document; malformed -> BundleRejected."""
    try:
        doc = json.loads(data)
        path, name, version = doc["bundle"], doc["name"], doc["version"]
    except (ValueError, KeyError, TypeError) as e:
        raise BundleRejected(f"deployment document for group {group!r} is malformed: {e}", reason="malformed") from e
    if doc.get("group") != group or not isinstance(path, str) or not path.startswith("bundles/") \
            or not isinstance(version, int) or not isinstance(name, str):
        raise BundleRejected(f"deployment document for group {group!r} does not describe a bundle for it",
                             reason="malformed")
    return path, name, version


@dataclass(frozen=True)
class ShadowEntry:
    """The deployment document's optional `shadow`: a bundle the group runs beside the serving one, never
    answering from it (docs/transport.md)."""

    bundle: str  # target path, bundles/<name>-<version>.bundle
    name: str
    version: int
    sha256: str


def parse_shadow(data: bytes, group: str) -> ShadowEntry | None:
    """The `shadow` entry of a signed deployment document (None when it names none); malformed -> BundleRejected.

    `parse_deployment` never reads it, so a bad shadow entry cannot hold up the deployment itself."""
    try:
        doc = json.loads(data)
        raw = doc.get("shadow") if isinstance(doc, dict) else None
    except ValueError as e:
        raise BundleRejected(f"deployment document for group {group!r} is malformed: {e}", reason="malformed") from e
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise BundleRejected(f"deployment document for group {group!r}: shadow must be an object",
                             reason="malformed")
    path, name, version, sha = raw.get("bundle"), raw.get("name"), raw.get("version"), raw.get("sha256")
    if not isinstance(path, str) or not path.startswith("bundles/") or not isinstance(name, str) \
            or isinstance(version, bool) or not isinstance(version, int) or not isinstance(sha, str):
        raise BundleRejected(f"deployment document for group {group!r}: shadow does not describe a bundle",
                             reason="malformed")
    return ShadowEntry(path, name, version, sha)


def _expect(fetcher: ChunkFetcher, client: TrustedClient, tf: TargetFile) -> None:
    """Register `tf`'s signed chunk plan: the fetcher checks every chunk against it as it arrives."""
    plan = client.chunk_plan(tf)
    fetcher.expect(plan.sha256, plan.length, plan.chunk_size, list(plan.chunk_hashes))


@dataclass(frozen=True)
class SignedCandidate:
    """What the group's signed deployment document says this device should run, with the signed TUF target info
    of the bundle and the deployment (agent/deploy's `Candidate` is the part of it the daemon sees)."""

    name: str
    version: int
    sha256: str
    bundle_tf: TargetFile
    deployment_tf: TargetFile
    deployment_file: Path  # in incoming/ until the bundle verified
    rollout: Membership | None = None  # the document's rollout, as it concerns this device (None: no rollout)


@dataclass(frozen=True)
class SignedShadow:
    """The bundle a signed deployment names as its shadow, with its signed TUF target info."""

    name: str
    version: int
    sha256: str
    bundle_tf: TargetFile


class BundleSource:
    """The deployment steps CHECK, DOWNLOAD and VERIFY over one trusted client and fetcher."""

    def __init__(self, cfg: AgentConfig, fetcher: ChunkFetcher, transport: str) -> None:
        self.cfg, self.fetcher, self.transport = cfg, fetcher, transport
        self.state = cfg.agent.state_dir
        self.client = TrustedClient(self.state / "tuf", cfg.trust.root, fetcher, METADATA_URL, TARGETS_URL,
                                    max_metadata_bytes=cfg.limits.max_metadata_bytes,
                                    max_target_bytes=cfg.limits.max_bundle_bytes)
        self.last_rollout: Membership | None = None  # the latest check's rollout membership (None: no rollout)

    def check(self) -> SignedCandidate:
        """Refresh trust and read the group's deployment: the bundle it names for this device (its rollout entry
        decides between the new bundle and `previous`, agent/deploy/rollout.py). BundleRejected "not_found" when
        nothing is signed for the group, or when the device is outside a rollout's wave and the document names no
        previous bundle (then `last_rollout.follows` is "none")."""
        self.last_rollout = None
        self.client.refresh()
        group = self.cfg.agent.group
        dep_tf = self.client.require_target(f"deployments/{group}.json")
        _expect(self.fetcher, self.client, dep_tf)
        # The deployment document waits in incoming/ until its bundle verified: deployments/ never names a
        # bundle the device does not hold.
        dep_file = self.client.download(dep_tf, self.state / "incoming")
        self.fetcher.discard(dep_tf.hashes["sha256"])  # every periodic check reads it: leave no partial file
        data = dep_file.read_bytes()
        parse_deployment(data, group)
        doc = json.loads(data)
        device = self.cfg.agent.device_id
        self.last_rollout = member = membership(doc, device, group)
        target = target_for(doc, device, group)
        if target is None:
            assert member is not None  # only a rollout leaves a device without a target
            raise BundleRejected(f"device {device!r} is outside rollout {member.rollout_id!r}'s reached wave and "
                                 "the deployment names no previous bundle", reason="not_found")
        # The target chosen, `previous` included, must be a signed target whose signed name and version are what
        # the document says: the same check whichever entry named it.
        bundle_tf = self.client.require_target(target.bundle)
        custom: dict[str, Any] = dict(bundle_tf.custom)
        if custom.get("name") != target.name or custom.get("version") != target.version:
            raise BundleRejected(f"{target.bundle} is signed as {custom.get('name')} v{custom.get('version')}, the "
                                 f"deployment says {target.name} v{target.version}", reason="mismatch")
        self._content_key(bundle_tf)  # an encrypted bundle this device cannot read is refused before any download
        return SignedCandidate(target.name, target.version, bundle_tf.hashes["sha256"], bundle_tf, dep_tf, dep_file,
                               member)

    def shadow(self, cand: SignedCandidate) -> SignedShadow | None:
        """The shadow bundle `cand`'s deployment document names (None when none), checked against its signed
        target like the candidate itself: BundleRejected "malformed", "not_found" or "mismatch"."""
        entry = parse_shadow(cand.deployment_file.read_bytes(), self.cfg.agent.group)
        if entry is None:
            return None
        tf = self.client.require_target(entry.bundle)
        custom: dict[str, Any] = dict(tf.custom)
        if custom.get("name") != entry.name or custom.get("version") != entry.version \
                or tf.hashes.get("sha256") != entry.sha256:
            raise BundleRejected(f"shadow {entry.bundle} is signed as {custom.get('name')} v{custom.get('version')} "
                                 f"({tf.hashes.get('sha256', '?')[:12]}), the deployment says {entry.name} "
                                 f"v{entry.version} ({entry.sha256[:12]})", reason="mismatch")
        self._content_key(tf)
        return SignedShadow(entry.name, entry.version, tf.hashes["sha256"], tf)

    def download(self, cand: SignedCandidate | SignedShadow) -> Path:
        """The verified target file: the bundle, or the ciphertext of an encrypted one (in encrypted/); for an
        encrypted bundle already decrypted into bundles/ (a VERIFY re-run, another `edge-agent fetch`), that
        plaintext, checked against its signed sha256 and length, without downloading anything."""
        enc = self._encryption(cand.bundle_tf)
        if enc is not None and (done := self._decrypted(cand.bundle_tf, enc)) is not None:
            return done
        _expect(self.fetcher, self.client, cand.bundle_tf)
        return self.client.download(cand.bundle_tf, self.state / ("encrypted" if enc is not None else "bundles"))

    def bundle_file(self, cand: SignedCandidate | SignedShadow) -> Path:
        """Where the verified (decrypted) bundle is once VERIFY passed."""
        return self.state / "bundles" / cand.bundle_tf.path.rpartition("/")[2]

    # --- encrypted bundles ------------------------------------------------------------------------------------

    def _encryption(self, tf: TargetFile) -> confidential.Encryption | None:
        return confidential.Encryption.from_custom(dict(tf.custom), tf.path)

    def _decrypted(self, tf: TargetFile, enc: confidential.Encryption) -> Path | None:
        """bundles/<name> when it is this encrypted bundle's plaintext exactly as signed (sha256 and length)."""
        path = self.state / "bundles" / tf.path.rpartition("/")[2]
        try:
            if path.stat().st_size != enc.plaintext.length or sha256_file(path) != enc.plaintext.sha256:
                return None
        except OSError:
            return None
        log.debug("%s is decrypted already", tf.path)
        return path

    def _content_key(self, tf: TargetFile) -> bytes | None:
        """The encrypted bundle's content key, unwrapped from this device's entry in its signed grants document
        with the device's key (None: the bundle is not encrypted). BundleRejected "not_granted" when the device has
        no key configured or no grant, "key_unavailable" when the key file is unusable or the grant does not open
        with it."""
        enc = self._encryption(tf)
        if enc is None:
            return None
        device = self.cfg.agent.device_id
        if not self.cfg.trust.decrypt_key_file:
            raise BundleRejected(f"{tf.path} is encrypted and this device has no [trust] decrypt_key_file: it takes "
                                 "no encrypted bundles", reason="not_granted")
        grants_tf = self.client.require_target(enc.grants)
        _expect(self.fetcher, self.client, grants_tf)
        data = self.client.download(grants_tf, self.state / "grants").read_bytes()
        self.fetcher.discard(grants_tf.hashes["sha256"])
        wrapped = confidential.Grants.parse(data, enc.grants).for_device(device, tf.path, tf.hashes["sha256"])
        try:
            key = confidential.load_device_key(Path(self.cfg.trust.decrypt_key_file))
        except ConfigError as e:  # the device's problem, fixed on the device: never a verdict on the bundle
            raise BundleRejected(str(e), reason="key_unavailable") from e
        return confidential.unwrap_key(wrapped, key, confidential.key_info(tf.path, tf.hashes["sha256"]))

    def _decrypt(self, tf: TargetFile, ciphertext: Path) -> Path:
        """Decrypt the verified `ciphertext` into bundles/ (deleting the ciphertext once done); the bundle's path."""
        enc, key = self._encryption(tf), self._content_key(tf)
        assert enc is not None and key is not None
        _private_dir(self.state)
        out = self.state / "bundles"
        out.mkdir(exist_ok=True)
        final = out / tf.path.rpartition("/")[2]
        partial = out / f".{final.name}.decrypting"
        confidential.decrypt_file(ciphertext, partial, key, enc.plaintext)
        os.replace(partial, final)
        fsync_dir(out)
        ciphertext.unlink()
        log.info("decrypted %s (%d bytes)", tf.path, enc.plaintext.length)
        return final

    def _check_bundle(self, cand: SignedCandidate | SignedShadow, path: Path, extract_to: Path | None) -> Manifest:
        """The bundle's own manifest and hashes checked (and unpacked), as signed; an unusable file is deleted.
        An encrypted bundle's `path` is its ciphertext, decrypted first (unless `download` found it decrypted)."""
        if self._encryption(cand.bundle_tf) is not None and path != self.bundle_file(cand):
            try:
                path = self._decrypt(cand.bundle_tf, path)
            except BundleRejected as e:
                if e.reason not in NOT_BLAMED:  # kept: a grant may come later, a key be fixed; the ciphertext is fine
                    path.unlink(missing_ok=True)
                raise
        try:
            if extract_to is not None:
                # leftovers of an attempt killed midway: the final directory, or verify_bundle's staging one
                for stale in [extract_to, *extract_to.parent.glob(f".{extract_to.name}.*")]:
                    if stale.is_dir():
                        shutil.rmtree(stale)
            manifest = verify_bundle(path, dest=extract_to, max_bytes=self.cfg.limits.max_bundle_bytes).manifest
            if (manifest.name, manifest.version) != (cand.name, cand.version):
                raise BundleRejected(f"{cand.bundle_tf.path} holds {manifest.name} v{manifest.version}, signed as "
                                     f"{cand.name} v{cand.version}", reason="mismatch")
        except BundleRejected:
            path.unlink(missing_ok=True)  # signed but unusable: never leave it where a later step could pick it up
            raise
        return manifest

    def verify_shadow(self, shadow: SignedShadow, path: Path, extract_to: Path | None = None) -> Manifest:
        """Like `verify`, but records nothing: a shadow is no deployment, the state machine never sees it."""
        manifest = self._check_bundle(shadow, path, extract_to)
        self.fetcher.discard(shadow.sha256)
        return manifest

    def verify(self, cand: SignedCandidate, path: Path, extract_to: Path | None = None) -> Manifest:
        """Check the bundle's own manifest and hashes (and unpack it); only then record the deployment."""
        manifest = self._check_bundle(cand, path, extract_to)
        (self.state / "deployments").mkdir(exist_ok=True)
        os.replace(cand.deployment_file, self.state / "deployments" / cand.deployment_file.name)
        fsync_dir(self.state / "deployments")
        self.fetcher.discard(cand.sha256)  # the verified bundle is kept; its chunks are no longer needed
        return manifest


def _private_dir(path: Path) -> None:
    """Make the state directory 0700 before plaintext of an encrypted bundle goes into it (systemd's
    StateDirectoryMode=0700 has done so already under edge-agent.service)."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("state directory %s was mode %04o; making it 0700 before decrypting into it", path, mode)
        os.chmod(path, 0o700)


def fetch_all(source: BundleSource) -> FetchResult:
    """CHECK, DOWNLOAD and VERIFY in one go (the one-shot `edge-agent fetch`)."""
    cand = source.check()
    path = source.download(cand)
    source.verify(cand, path)
    return FetchResult(cand.name, cand.version, cand.sha256, source.bundle_file(cand), source.transport)


def fetch_with(cfg: AgentConfig, fetcher: ChunkFetcher, transport: str) -> FetchResult:
    return fetch_all(BundleSource(cfg, fetcher, transport))


def with_source(cfg: AgentConfig, work: Callable[[BundleSource], _T]) -> _T:
    """`work` over MQTT (this process's own client); on a transport failure, over the HTTP mirror if configured."""
    from agent.transport.mqtt import MqttClient, unique_client_id
    from agent.transport.topics import Topics
    from agent.trust.mqtt_fetcher import MqttFetcher

    state = cfg.agent.state_dir
    state.mkdir(parents=True, exist_ok=True)
    try:
        # unique per process: a worker and `edge-agent fetch` (or a leftover worker) never take over each other
        with MqttClient(cfg.mqtt.url, unique_client_id(f"edge-agent-{cfg.agent.device_id}-fetch"),
                        prefix=Topics(cfg.topic_prefix), ca_file=cfg.mqtt.ca_file or None,
                        cert_file=cfg.mqtt.cert_file or None, key_file=cfg.mqtt.key_file or None,
                        receive_window=cfg.mqtt.receive_window, retained_grace=cfg.mqtt.retained_grace_s) as mqtt:
            mqtt.connect(timeout=cfg.mqtt.connect_timeout_s)
            fetcher = MqttFetcher(mqtt, state / "chunks", timeout=cfg.limits.chunk_timeout_s)
            return work(BundleSource(cfg, fetcher, "mqtt"))
    except TransportError as e:
        if not cfg.mirror.http:
            raise
        log.warning("MQTT fetch failed (%s); trying the HTTP mirror %s", e, cfg.mirror.http)
    from agent.trust.http_fetcher import HttpFetcher

    return work(BundleSource(cfg, HttpFetcher(state / "partial", base_url=cfg.mirror.http), "http"))


def fetch(cfg: AgentConfig) -> FetchResult:
    """Fetch over MQTT; when that fails for transport reasons and a mirror is configured, over HTTP."""
    return with_source(cfg, fetch_all)
