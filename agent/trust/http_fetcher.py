"""A `ChunkFetcher` (a python-tuf `FetcherInterface`) for a static HTTP mirror (docs/transport.md's `--http-dir`).

URLs are used as given (`https://mirror/base/tuf/3.root.json`); `mqtt:///tuf/...` and `mqtt:///targets/...` URLs are
mapped onto `base_url`, so an agent can swap its MQTT fetcher for this one without touching the Updater. Targets are
downloaded into `partial_dir/<sha256>.partial` and resumed with a Range request; with a signed chunk plan
(`expect()`) every chunk is checked before it is written, so a partial file only ever holds verified bytes.
This module imports no MQTT code (no paho): the mirror is the fallback for when MQTT fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO
from urllib.parse import urljoin, urlsplit

import requests
from tuf.api.exceptions import DownloadError, DownloadHTTPError
from tuf.ngclient.fetcher import FetcherInterface

from agent.trust.chunks import MAX_CHUNK_SIZE, ChunkPlan
from agent.trust.fetcher import FetchError, PlannedTargets, parse_tuf_url

if TYPE_CHECKING:
    from hashlib import _Hash

log = logging.getLogger(__name__)

_READ_SIZE = 64 * 1024


class HttpFetcher(PlannedTargets, FetcherInterface):
    """requests with connect/read timeouts; `bytes_received` counts body bytes off the wire."""

    def __init__(
        self,
        partial_dir: Path,
        *,
        base_url: str | None = None,
        timeout: tuple[float, float] = (5.0, 30.0),
        session: requests.Session | None = None,
        max_chunk_size: int = MAX_CHUNK_SIZE,
    ) -> None:
        super().__init__()
        self.partial_dir = Path(partial_dir)
        self.base_url = base_url if base_url is None or base_url.endswith("/") else base_url + "/"
        self.timeout = timeout
        self.session = session or requests.Session()
        self.max_chunk_size = max_chunk_size
        self.bytes_received = 0

    @contextlib.contextmanager
    def open_complete(self, url: str, max_length: int) -> Iterator[IO[bytes] | None]:
        """Always None: a mirror download is streamed and the partial file removed once complete, so TUF spools its
        own copy (`ChunkFetcher.open_complete`)."""
        yield None

    # ---- FetcherInterface

    def _fetch(self, url: str) -> Iterator[bytes]:
        http_url = self._map(url)
        kind, value = parse_tuf_url(http_url)
        if kind == "metadata":
            response = self._get(http_url, {})
            if response.status_code != 200:
                self._http_error(response, http_url)
            return self._body(response)
        return self._fetch_target(http_url, value)

    def _map(self, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme in ("http", "https"):
            return url
        if parts.scheme == "mqtt" and self.base_url is not None:
            return urljoin(self.base_url, parts.path.lstrip("/"))
        raise DownloadError(f"HttpFetcher cannot fetch {url} (no base_url for mqtt:/// URLs)")

    def _get(self, url: str, headers: dict[str, str]) -> requests.Response:
        try:
            return self.session.get(url, headers=headers, timeout=self.timeout, stream=True)
        except requests.RequestException as e:
            raise FetchError(f"GET {url} failed: {e}") from e

    @staticmethod
    def _http_error(response: requests.Response, url: str) -> None:
        response.close()
        if response.status_code == 404:
            raise DownloadHTTPError(f"{url} not found", 404)
        raise DownloadHTTPError(f"GET {url}: HTTP {response.status_code} {response.reason}", response.status_code)

    def _body(self, response: requests.Response) -> Iterator[bytes]:
        with response:
            try:
                for block in response.iter_content(_READ_SIZE):
                    self.bytes_received += len(block)
                    yield block
            except requests.RequestException as e:
                raise FetchError(f"reading {response.url} failed: {e}") from e

    # ---- targets with Range resume

    def _verified_prefix(self, path: Path, plan: ChunkPlan | None) -> int:
        """Bytes of the partial file to keep: all of it without a plan, else its leading run of good chunks."""
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return 0
        if plan is None:
            return size
        keep = 0
        with open(path, "rb") as f:
            for index in range(plan.count):
                n = plan.chunk_length(index)
                data = f.read(n)
                if len(data) != n or hashlib.sha256(data).hexdigest() != plan.chunk_hashes[index]:
                    break
                keep += n
        return keep

    def _fetch_target(self, url: str, sha256: str) -> Iterator[bytes]:
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        path = self.partial_path(sha256)
        plan = self._plans.get(sha256)
        offset = self._verified_prefix(path, plan)
        if path.exists():
            os.truncate(path, offset)
        response: requests.Response | None = None
        if plan is None or offset < plan.length:
            response = self._get(url, {"Range": f"bytes={offset}-"} if offset else {})
            if response.status_code == 416 and offset:
                # the mirror says we are past its end: the partial file is not a prefix of this file
                response.close()
                os.truncate(path, 0)
                offset = 0
                response = self._get(url, {})
            if response.status_code == 200 and offset:
                log.info("%s ignored our Range request; downloading from the start", url)
                os.truncate(path, 0)
                offset = 0
            elif response.status_code == 206:
                content_range = response.headers.get("Content-Range", "")
                if not content_range.startswith(f"bytes {offset}-"):
                    response.close()
                    raise FetchError(f"{url}: asked for bytes {offset}- but got Content-Range {content_range!r}")
            elif response.status_code != 200:
                self._http_error(response, url)
        if offset:
            log.info("resuming %s at byte %d", url, offset)
        return self._target_body(path, offset, plan, response, sha256)

    def _target_body(
        self, path: Path, offset: int, plan: ChunkPlan | None, response: requests.Response | None, sha256: str
    ) -> Iterator[bytes]:
        whole = hashlib.sha256()
        with open(path, "ab") as out:
            with open(path, "rb") as existing:  # replay what is already here, so TUF sees the whole file
                while offset and (block := existing.read(min(_READ_SIZE, offset - existing.tell()))):
                    whole.update(block)
                    yield block
            if response is not None:
                yield from self._stream(response, out, offset, plan, whole)
        if whole.hexdigest() != sha256:
            path.unlink(missing_ok=True)
            raise FetchError(f"target {sha256[:12]} from the mirror does not match its hash; partial file removed")
        path.unlink(missing_ok=True)  # complete and verified: the caller has every byte

    def _stream(
        self, response: requests.Response, out: BinaryIO, offset: int, plan: ChunkPlan | None, whole: _Hash
    ) -> Iterator[bytes]:
        position = offset
        pending = bytearray()  # with a plan: the current chunk, held until it matches its signed hash
        with response:
            try:
                for block in response.iter_content(_READ_SIZE):
                    self.bytes_received += len(block)
                    if plan is None:
                        out.write(block)
                        position += len(block)
                        whole.update(block)
                        yield block
                        continue
                    pending += block
                    while pending:
                        index = position // plan.chunk_size
                        if index >= plan.count:
                            raise FetchError(f"{response.url}: more than the signed {plan.length} bytes")
                        n = plan.chunk_length(index)
                        if len(pending) < n:
                            break
                        chunk = bytes(pending[:n])
                        del pending[:n]
                        if hashlib.sha256(chunk).hexdigest() != plan.chunk_hashes[index]:
                            raise FetchError(f"{response.url}: chunk {index} does not match its signed hash")
                        out.write(chunk)
                        out.flush()
                        position += n
                        whole.update(chunk)
                        yield chunk
            except requests.RequestException as e:
                raise FetchError(f"reading {response.url} failed at byte {position}: {e}") from e
        if plan is not None and (pending or position != plan.length):
            raise FetchError(f"{response.url}: ended at byte {position + len(pending)} of {plan.length}")
