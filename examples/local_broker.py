"""A throwaway mosquitto on a free port with its own config: for tests, benchmarks and the demo.

Never the system broker on 1883: a user's machine may not have one, and ours must not touch theirs.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


class MosquittoMissing(RuntimeError):
    pass


MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str:
    for candidate in (os.environ.get("EDGESHIP_MOSQUITTO"), *MOSQUITTO_CANDIDATES, shutil.which("mosquitto")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise MosquittoMissing(
        "mosquitto is not installed (looked in /usr/sbin, /usr/local/sbin and PATH; set EDGESHIP_MOSQUITTO): "
        "`apt-get install mosquitto`"
    )


@dataclass(frozen=True)
class MosquittoTls:
    """A TLS listener that takes only clients with a certificate from `cafile` (docs/security.md): the broker's
    own certificate and key, optionally a CRL and an ACL file; the certificate's CN becomes the user name."""

    cafile: Path
    certfile: Path
    keyfile: Path
    crlfile: Path | None = None
    acl_file: Path | None = None

    def conf(self) -> list[str]:
        return [f"cafile {self.cafile}", f"certfile {self.certfile}", f"keyfile {self.keyfile}",
                *([f"crlfile {self.crlfile}"] if self.crlfile else []),
                "require_certificate true", "use_identity_as_username true",
                *([f"acl_file {self.acl_file}"] if self.acl_file else [])]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """One mosquitto process with its config, log and (optionally) persistence in `workdir`."""

    def __init__(self, workdir: Path, *, persistent: bool = False, extra_conf: str = "",
                 tls: MosquittoTls | None = None) -> None:
        """`tls`: the listener speaks only TLS with client certificates (mqtts://localhost:<port>), anonymous
        clients refused."""
        self.binary = find_mosquitto()
        self.tls = tls
        self.workdir = workdir
        self.persistent = persistent
        self.extra_conf = extra_conf
        self.port = free_port()
        self.log_path = workdir / "mosquitto.log"
        self.conf_path = workdir / "mosquitto.conf"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtts://localhost:{self.port}" if self.tls else f"mqtt://127.0.0.1:{self.port}"

    def _write_conf(self) -> None:
        lines = [
            f"listener {self.port} 127.0.0.1",
            *(self.tls.conf() if self.tls else []),
            f"allow_anonymous {'false' if self.tls else 'true'}",
            # run as whoever runs the tests: as root mosquitto would switch to user `mosquitto` and lose the tmp dir
            f"user {getpass.getuser()}",
            f"persistence {'true' if self.persistent else 'false'}",
            f"persistence_location {self.workdir}/",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            self.extra_conf,
        ]
        self.conf_path.write_text("\n".join(lines) + "\n")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self._write_conf()
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf_path)],
            stdout=subprocess.DEVNULL,
            stderr=(self.workdir / "mosquitto.stderr").open("ab"),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                stderr = (self.workdir / "mosquitto.stderr").read_text(errors="replace")
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {stderr}{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not accept connections on port {self.port} within {timeout:g}s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM lets mosquitto write its persistence file; SIGKILL loses what it has not saved."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads its config file, its ACL and password files and (2.0.11, measured) its
        crlfile; connections already open stay."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGHUP)

    def restart(self) -> None:
        """Stop and start on the same port (retained messages survive only with persistent=True)."""
        self.stop()
        self.start()
