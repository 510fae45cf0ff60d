"""The agent's trust decisions: python-tuf's ngclient behind edgeship's typed errors (see docs/transport.md).

Nothing here talks to a broker: the transport is a `ChunkFetcher` handed in (MQTT retained topics, an HTTP mirror,
or an in-memory store in tests). Everything the agent trusts comes out of this module verified by TUF: metadata
(rollback, freeze, mix-and-match, key rotation), target length and hashes, and the signed per-chunk sha256 list a
fetcher uses to check each chunk as it arrives.

Trusted metadata on disk is written only by ngclient itself, after verification. ngclient's layout (tuf >= 6):
`root_history/<N>.root.json`, `root.json` (a symlink to the newest trusted root), `timestamp.json`,
`snapshot.json`, `targets.json`. The Updater, and so every trust decision, is in this module; python-tuf is also
imported, only within agent/trust, by:
    fetcher.py       `DownloadError`, the base python-tuf expects of `FetchError`
    mqtt_fetcher.py  `FetcherInterface` (its base class) and the download errors ngclient understands (a 404)
    http_fetcher.py  the same, for the HTTP mirror
    fetch.py         `TargetFile`, the signed target info that `SignedCandidate` carries between the steps
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.api.serialization import DeserializationError
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from agent.errors import BundleRejected, EdgeshipError, RejectReason, TransportError
from agent.fsutil import fsync_dir
from agent.trust.chunks import ChunkPlan
from agent.trust.fetcher import ChunkFetcher

logger = logging.getLogger(__name__)

DEFAULT_MAX_METADATA_BYTES = 512 * 1024
DEFAULT_MAX_TARGET_BYTES = 2 << 30
MAX_TIMESTAMP_BYTES = 16 * 1024  # a timestamp is ~1 KiB; it is the one file fetched with no signed length
MAX_ROOT_ROTATIONS = 64
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_LENGTH_MSG = re.compile(r"Observed length (\d+) does not match expected length (\d+)")
_R = TypeVar("_R")


# --- chunk plans ---------------------------------------------------------------------------------------------


def chunk_plan(tf: TargetFile) -> ChunkPlan:
    """Read and validate the signed `custom.chunk_size` / `custom.chunks` of a target; a bad plan is a rejection."""
    custom: Any = tf.custom
    if not isinstance(custom, dict):
        raise BundleRejected(f"{tf.path}: invalid chunk plan: the signed custom metadata is missing",
                             reason="bad_chunk_plan")
    return ChunkPlan.create(tf.hashes.get("sha256"), tf.length, custom.get("chunk_size"), custom.get("chunks"),
                            path=tf.path)


def target_url(target_base_url: str, tf: TargetFile) -> str:
    """The URL ngclient asks the fetcher for, with consistent snapshots: `<base><dir>/<sha256>.<basename>`."""
    base = target_base_url if target_base_url.endswith("/") else target_base_url + "/"
    dirname, sep, basename = tf.path.rpartition("/")
    # ngclient prefixes with the first listed hash; our repository lists only sha256.
    return f"{base}{dirname}{sep}{next(iter(tf.hashes.values()))}.{basename}"


# --- the client ----------------------------------------------------------------------------------------------


class TrustedClient:
    """One device's view of the TUF repository.

    `root_json` is the provisioned root; it seeds `metadata_dir` only the first time. After that the newest root
    ngclient verified (root.json in `metadata_dir`) is the trust anchor, so a device keeps following root
    rotations across restarts without re-walking from the provisioned one.
    """

    def __init__(self, metadata_dir: Path, root_json: Path | bytes, fetcher: ChunkFetcher,
                 metadata_base_url: str, target_base_url: str,
                 max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
                 max_target_bytes: int = DEFAULT_MAX_TARGET_BYTES) -> None:
        self.metadata_dir = metadata_dir
        self._root_json = root_json
        self._fetcher = _RecordingFetcher(fetcher)
        self.metadata_base_url = metadata_base_url
        self.target_base_url = target_base_url
        self.max_target_bytes = max_target_bytes
        # ngclient bounds each metadata download by these unless the parent metadata signed a length (our
        # repository signs lengths for snapshot and targets, so these matter for root and timestamp).
        self.config = UpdaterConfig(
            max_root_rotations=MAX_ROOT_ROTATIONS,
            root_max_length=max_metadata_bytes,
            timestamp_max_length=min(max_metadata_bytes, MAX_TIMESTAMP_BYTES),
            snapshot_max_length=max_metadata_bytes,
            targets_max_length=max_metadata_bytes,
        )
        self._updater: Updater | None = None

    # ngclient allows one refresh per Updater, so each refresh() builds a fresh one over the same directory.
    def refresh(self) -> None:
        """Fetch and verify root (following rotations), timestamp, snapshot and targets."""
        updater = self._new_updater()
        self._guard("refresh", updater.refresh)
        self._updater = updater

    def target_info(self, path: str) -> TargetFile | None:
        """The signed info for `path`, or None when the targets metadata does not list it."""
        updater = self._current()
        return self._guard(path, lambda: updater.get_targetinfo(path))

    def require_target(self, path: str) -> TargetFile:
        tf = self.target_info(path)
        if tf is None:
            raise BundleRejected(f"{path} is not listed in the signed targets metadata", reason="not_found")
        return tf

    def chunk_plan(self, tf: TargetFile) -> ChunkPlan:
        return chunk_plan(tf)

    def target_url(self, tf: TargetFile) -> str:
        return target_url(self.target_base_url, tf)

    def trusted_root_version(self) -> int:
        return _read_root(self.metadata_dir / "root.json").signed.version

    def download(self, tf: TargetFile, dest_dir: Path) -> Path:
        """Download `tf` into `dest_dir/<basename>` and return that path; the file appears there only once TUF
        has verified its length and hashes. A file already there that verifies is reused without a download."""
        if tf.length > self.max_target_bytes:
            raise BundleRejected(f"{tf.path} is {tf.length} bytes, more than the limit of {self.max_target_bytes}",
                                 reason="too_large")
        chunk_plan(tf)  # a target whose signed chunk list is bad is refused before any byte is fetched
        name = tf.path.rpartition("/")[2]
        if not _SAFE_NAME.fullmatch(name) or set(name) == {"."}:
            raise BundleRejected(f"unsafe target file name {name!r}", reason="unsafe_path")
        updater = self._current()
        dest_dir.mkdir(parents=True, exist_ok=True)
        final = dest_dir / name
        if updater.find_cached_target(tf, str(final)) is not None:
            logger.debug("%s already downloaded and verified", tf.path)
            return final
        # A fixed name: a crash mid-copy leaves at most this one file, which the next attempt truncates.
        tmp_name = str(dest_dir / f".{name}.partial")
        self._fetcher.temp_dir = dest_dir
        try:
            self._guard(tf.path, lambda: updater.download_target(tf, tmp_name, self.target_base_url))
            with open(tmp_name, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp_name, final)
            fsync_dir(dest_dir)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
        logger.info("downloaded and verified %s (%d bytes)", tf.path, tf.length)
        return final

    # --- internals -------------------------------------------------------------------------------------------

    def _current(self) -> Updater:
        if self._updater is None:
            self.refresh()
        assert self._updater is not None
        return self._updater

    def _new_updater(self) -> Updater:
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        bootstrap: bytes | None = None
        if not (self.metadata_dir / "root.json").exists():
            bootstrap = self._root_json if isinstance(self._root_json, bytes) else self._root_json.read_bytes()
        # bootstrap=None: use the cached root.json, the newest root ngclient has verified.
        return self._guard("trusted root", lambda: Updater(
            str(self.metadata_dir), self.metadata_base_url, target_base_url=self.target_base_url,
            fetcher=self._fetcher, config=self.config, bootstrap=bootstrap))

    def _guard(self, what: str, call: Callable[[], _R]) -> _R:
        self._fetcher.last = None
        try:
            return call()
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError) as e:
            err = self._translate(what, e)
            if err is e:
                raise
            if err is e.__cause__:
                raise err from None
            raise err from e

    def _translate(self, what: str, e: Exception) -> EdgeshipError:
        where = self._fetcher.last.url if self._fetcher.last is not None else what
        if isinstance(e, EdgeshipError):  # a fetcher error that is already ours (e.g. a TransportError subclass)
            return e
        if isinstance(e, tuf_exc.DownloadError):
            if isinstance(e.__cause__, EdgeshipError):  # our own fetcher's verdict, wrapped by fetch()
                return e.__cause__
            if isinstance(e, tuf_exc.DownloadLengthMismatchError):
                return BundleRejected(f"{where}: more data than allowed: {e}", reason="too_large")
            if isinstance(e, tuf_exc.DownloadHTTPError):
                return TransportError(f"{where}: not available from the transport (status {e.status_code})")
            return TransportError(f"{where}: download failed: {e}")
        reason: RejectReason
        if isinstance(e, tuf_exc.ExpiredMetadataError):
            reason = "expired"
        elif isinstance(e, tuf_exc.BadVersionNumberError):
            reason = "rollback"
        elif isinstance(e, tuf_exc.UnsignedMetadataError):
            reason = self._signature_reason()
        elif isinstance(e, tuf_exc.LengthOrHashMismatchError):
            m = _LENGTH_MSG.search(str(e))
            reason = "too_large" if m and int(m.group(1)) > int(m.group(2)) else "hash_mismatch"
        elif isinstance(e, DeserializationError):
            reason = "malformed"
        else:
            reason = "invalid_metadata"
        logger.warning("TUF rejected %s: %s (%s)", where, e, reason)
        return BundleRejected(f"{where}: {e}", reason=reason)

    def _signature_reason(self) -> RejectReason:
        """"unknown_key" when no signature on the rejected metadata is by a key the trusted root gives that role,
        "threshold" when some are but not enough (ngclient reports both as UnsignedMetadataError)."""
        last = self._fetcher.last
        if last is None or last.data is None:
            return "threshold"
        try:
            md = Metadata.from_bytes(last.data)
            trusted = _read_root(self.metadata_dir / "root.json").signed
            known = set(trusted.roles[md.signed.type].keyids)
        except (tuf_exc.RepositoryError, OSError, KeyError):
            return "threshold"
        # no signature at all is "too few"; only signatures that are all foreign mean an unknown key
        return "threshold" if not md.signatures or known & set(md.signatures) else "unknown_key"


@dataclass
class _Download:
    url: str
    data: bytes | None = None  # metadata bytes once received (targets are not kept)


class _RecordingFetcher(FetcherInterface):
    """Passes everything to the injected fetcher and remembers the last URL (and metadata bytes) asked for, so a
    rejection can name the file and tell an unknown key from too few signatures."""

    def __init__(self, inner: ChunkFetcher) -> None:
        self.inner = inner
        self.last: _Download | None = None
        self.temp_dir: Path | None = None  # where a target is spooled before ngclient verifies it

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self.inner.fetch(url)

    def download_bytes(self, url: str, max_length: int) -> bytes:
        self.last = _Download(url)
        with _as_download_error(url):
            data = self.inner.download_bytes(url, max_length)
        self.last.data = data
        return data

    @contextlib.contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """Like FetcherInterface.download_file, but spooled in `temp_dir` (the state directory) rather than $TMPDIR,
        which on many devices is a small tmpfs; the file is anonymous, so a crash leaves nothing behind. A fetcher
        that keeps the whole target in a file of its own (MqttFetcher.open_complete) hands that over instead."""
        self.last = _Download(url)
        with contextlib.ExitStack() as stack:
            with _as_download_error(url):  # MqttFetcher: its own verified file; HttpFetcher: None
                whole = stack.enter_context(self.inner.open_complete(url, max_length))
            if whole is not None:
                yield whole  # ngclient hashes and copies it; its verification errors pass unwrapped
                return
            spool = stack.enter_context(tempfile.TemporaryFile(dir=self.temp_dir))
            with _as_download_error(url):
                received = 0
                for chunk in self.inner.fetch(url):
                    received += len(chunk)
                    if received > max_length:
                        raise tuf_exc.DownloadLengthMismatchError(
                            f"{url}: received {received} bytes, more than the signed length {max_length}")
                    spool.write(chunk)
            spool.seek(0)
            yield spool  # ngclient's verification errors are raised here and must pass unwrapped


@contextlib.contextmanager
def _as_download_error(url: str) -> Iterator[None]:
    """FetcherInterface.fetch() wraps only errors raised when a fetch starts; ones raised while iterating chunks
    escape raw. Make every transport failure a DownloadError; our own verdicts (BundleRejected) pass as they are."""
    try:
        yield
    except (tuf_exc.DownloadError, EdgeshipError):
        raise
    except Exception as e:
        raise tuf_exc.DownloadError(f"failed to download {url}: {e}") from e


def _read_root(path: Path) -> Metadata[Root]:
    return Metadata[Root].from_bytes(path.read_bytes())
