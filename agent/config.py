"""Agent configuration: a TOML file, overridable by `EDGESHIP_<SECTION>_<KEY>` environment variables.

Every value has a bounded default; directories are arguments (systemd's `StateDirectory=`), never guessed.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.errors import ConfigError
from agent.ids import ID_RULE, UNPORTABLE, is_id


@dataclass(frozen=True)
class AgentSection:
    device_id: str
    state_dir: Path
    fleet: str = "default"
    group: str = "default"


@dataclass(frozen=True)
class MqttSection:
    # one broker, or several as `urls` (or comma-separated here): the client fails over between them
    # (docs/transport.md); after parsing `url` holds the whole list, comma-separated, which is what MqttClient takes
    url: str = "mqtt://127.0.0.1:1883"
    urls: tuple[str, ...] = ()
    topic_prefix: str = ""  # default: edgeship/<fleet>/
    ca_file: str = ""  # for mqtts:// with a private CA (the fleet CA: docs/security.md)
    # this device's client certificate and its key (unencrypted, not readable by group or others), for brokers
    # that require one: both or neither, only with mqtts://
    cert_file: str = ""
    key_file: str = ""
    connect_timeout_s: float = 10.0
    # chunks the broker may have on their way to a fetch at once (MQTT 5 Receive Maximum), each acknowledged once
    # stored: a killed fetch re-fetches at most this many, but a link carries at most this many per round trip
    receive_window: int = 1
    # a retained read's wait, after its barrier echoed, for topics not arrived yet before they count as absent
    # (MQTT orders messages per topic only; docs/transport.md): what every genuine "not found" costs
    retained_grace_s: float = 0.5


@dataclass(frozen=True)
class TrustSection:
    root: Path
    # this device's X25519 private key, unencrypted PKCS#8 PEM, mode 0600 (`packager device add` writes it): it
    # unwraps the content keys of encrypted bundles (docs/security.md); empty: this device takes no encrypted bundles
    decrypt_key_file: str = ""


@dataclass(frozen=True)
class MirrorSection:
    http: str = ""  # optional HTTP(S) mirror base URL, tried when MQTT fails


@dataclass(frozen=True)
class ServeSection:
    http: str = "127.0.0.1:8501"
    # most rows per inference request: caps the bundle manifest's max_batch (0: the manifest's value as it is)
    max_batch: int = 0


@dataclass(frozen=True)
class LimitsSection:
    max_bundle_bytes: int = 2 << 30
    max_metadata_bytes: int = 512 << 10
    chunk_timeout_s: float = 30.0


@dataclass(frozen=True)
class DeploySection:
    poll_interval_s: float = 300.0  # CHECK this often even without a notify poke
    probation_s: float = 60.0  # probation ends after this long ...
    probation_requests: int = 500  # ... or after this many requests, whichever comes first
    max_error_rate: float = 0.01  # server-side errors / answered requests during probation
    min_requests_for_rate: int = 20  # fewer requests than this: error rate and p95 are not judged
    stage_timeout_s: float = 120.0  # a model that loads or warms up longer than this counts as hung
    keep: int = 2  # known-good bundles kept on disk
    max_restarts: int = 3  # crashes of one deployment before it is rolled back
    threads: int = 1  # runtime threads per session


@dataclass(frozen=True)
class TelemetrySection:
    interval_s: float = 10.0  # a telemetry message this often (docs/telemetry.md)
    state_interval_s: float = 60.0  # the retained state again this often (0: only on change and reconnect)
    parity_interval_s: float = 3600.0  # golden parity through the serving model this often
    shadow_cpu_budget: float = 0.1  # share of one core a shadow bundle may use
    shadow_sample: float = 0.1  # share of live requests also run on the shadow bundle (within the budget)
    queue_max_messages: int = 100_000  # store-and-forward queue on disk while the broker is unreachable ...
    queue_max_bytes: int = 50_000_000  # ... bounded both ways: the oldest telemetry goes first, never events
    feedback_max_entries: int = 10_000  # recent predictions kept for labelled feedback ...
    feedback_ttl_s: float = 3600.0  # ... and for how long
    drift_window: int = 500  # the latest live outputs drift is judged on (sliding)
    drift_min_samples: int = 200  # fewer than this: drift is "unknown", never "fine"
    metrics: bool = True  # /metrics (Prometheus text) on the [serve] http server
    home_assistant: bool = False  # retained Home Assistant MQTT discovery configs for this device (docs/dashboard.md)


@dataclass(frozen=True)
class AgentConfig:
    agent: AgentSection
    mqtt: MqttSection
    trust: TrustSection
    mirror: MirrorSection
    serve: ServeSection
    limits: LimitsSection
    deploy: DeploySection = DeploySection()
    telemetry: TelemetrySection = TelemetrySection()

    @property
    def topic_prefix(self) -> str:
        return self.mqtt.topic_prefix or f"edgeship/{self.agent.fleet}/"


_SECTIONS: dict[str, type] = {"agent": AgentSection, "mqtt": MqttSection, "trust": TrustSection,
                              "mirror": MirrorSection, "serve": ServeSection, "limits": LimitsSection,
                              "deploy": DeploySection, "telemetry": TelemetrySection}
_BOUNDS = {"max_bundle_bytes": (1 << 10, 64 << 30), "max_metadata_bytes": (1 << 10, 64 << 20),
           "chunk_timeout_s": (0.1, 3600.0), "connect_timeout_s": (0.1, 600.0), "receive_window": (1, 1024),
           "retained_grace_s": (0.0, 60.0),
           "poll_interval_s": (1.0, 86400.0), "probation_s": (0.0, 86400.0), "probation_requests": (0, 10**9),
           "max_error_rate": (0.0, 1.0), "min_requests_for_rate": (1, 10**6), "stage_timeout_s": (1.0, 3600.0),
           "keep": (1, 64), "max_batch": (0, 65536), "max_restarts": (1, 100), "threads": (1, 256),
           "interval_s": (0.1, 86400.0), "state_interval_s": (0.0, 86400.0), "parity_interval_s": (1.0, 7 * 86400.0),
           "shadow_cpu_budget": (0.0, 1.0),
           "shadow_sample": (0.0, 1.0), "queue_max_messages": (100, 10**7), "queue_max_bytes": (1 << 20, 10 << 30),
           "feedback_max_entries": (0, 10**6), "feedback_ttl_s": (1.0, 30 * 86400.0), "drift_window": (10, 10**7),
           "drift_min_samples": (1, 10**7)}


def _convert(section: str, name: str, typ: Any, value: Any) -> Any:
    where = f"[{section}] {name}"
    try:
        if typ in (Path, "Path"):
            if not isinstance(value, str) or not value:
                raise ValueError("expected a path")
            return Path(value)
        if typ in ("tuple[str, ...]",):
            if isinstance(value, str):  # from an EDGESHIP_* variable: comma-separated
                value = value.split(",")
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise ValueError("expected a list of strings")
            return tuple(v.strip() for v in value)
        if typ in (bool, "bool"):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")  # from an EDGESHIP_* variable
            raise ValueError("expected true or false")
        if typ in (int, "int"):
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            out: Any = int(value)
        elif typ in (float, "float"):
            if isinstance(value, bool):
                raise ValueError("expected a number")
            out = float(value)
        else:
            if not isinstance(value, str):
                raise ValueError("expected a string")
            out = value
    except (TypeError, ValueError, OverflowError) as e:  # OverflowError: int(inf), float(10**400)
        raise ConfigError(f"{where}: {e}") from e
    if name in _BOUNDS:
        lo, hi = _BOUNDS[name]
        if not lo <= out <= hi:
            raise ConfigError(f"{where}: {out} is outside [{lo}, {hi}]")
    return out


def parse_config(data: Mapping[str, Any], env: Mapping[str, str] | None = None,
                 base_dir: Path | None = None) -> AgentConfig:
    """Build and validate a config from parsed TOML plus `EDGESHIP_*` overrides (pure: no file access)."""
    env = os.environ if env is None else env
    unknown = set(data) - set(_SECTIONS)
    if unknown:
        raise ConfigError(f"unknown section(s): {', '.join(sorted(unknown))}")
    _check_env_names(env)
    built: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        table = data.get(section, {})
        if not isinstance(table, dict):  # `agent = 1` is TOML too
            raise ConfigError(f"[{section}] must be a table, got {type(table).__name__}")
        raw = dict(table)
        known = {f.name: f for f in fields(cls)}
        extra = set(raw) - set(known)
        if extra:
            raise ConfigError(f"[{section}]: unknown key(s): {', '.join(sorted(extra))}")
        for name in known:
            key = f"EDGESHIP_{section.upper()}_{name.upper()}"
            if key in env:
                raw[name] = env[key]
        values = {}
        for name, f in known.items():
            if name in raw:
                values[name] = _convert(section, name, f.type, raw[name])
            elif f.default is f.default_factory:  # dataclasses.MISSING on both: required
                raise ConfigError(f"[{section}] {name} is required")
        try:
            built[section] = cls(**values)
        except TypeError as e:
            raise ConfigError(f"[{section}]: {e}") from e
    given = set(data.get("mqtt", {})) | {k for k, var in (("url", "EDGESHIP_MQTT_URL"), ("urls", "EDGESHIP_MQTT_URLS"))
                                         if var in env}
    mqtt = built["mqtt"]
    joined = ",".join(mqtt.urls)
    if mqtt.urls and "url" in given and mqtt.url != joined:  # equal: a config written back (fetch worker)
        raise ConfigError("[mqtt] url and urls: give one (url for one broker, urls = [...] for several)")
    if "urls" in given and not mqtt.urls and "url" not in given:
        raise ConfigError("[mqtt] urls: give at least one broker URL")
    if mqtt.urls:
        built["mqtt"] = replace(mqtt, url=joined)
    cfg = AgentConfig(**built)
    if base_dir is not None:  # relative paths in the file are relative to the file: every path the agent reads
        cfg = replace(cfg, agent=replace(cfg.agent, state_dir=base_dir / cfg.agent.state_dir),
                      trust=replace(cfg.trust, root=base_dir / cfg.trust.root,
                                    decrypt_key_file=str(base_dir / cfg.trust.decrypt_key_file)
                                    if cfg.trust.decrypt_key_file else ""),
                      mqtt=replace(cfg.mqtt, ca_file=_under(base_dir, cfg.mqtt.ca_file),
                                   cert_file=_under(base_dir, cfg.mqtt.cert_file),
                                   key_file=_under(base_dir, cfg.mqtt.key_file)))
    _validate(cfg)
    return cfg


def _under(base_dir: Path, path: str) -> str:
    return str(base_dir / path) if path else ""


# `EDGESHIP_*` variables that are not agent config overrides: read by other programs of the project, so they may
# well be set in the agent's environment too (the refresh unit's drop-in, the tests' broker).
OTHER_ENV = frozenset({
    "EDGESHIP_MOSQUITTO",  # examples/local_broker.py: the mosquitto binary the tests and benchmarks start
    "EDGESHIP_REPO", "EDGESHIP_BROKER", "EDGESHIP_FLEET",  # systemd/edgeship-refresh.service
    "EDGESHIP_CA_FILE", "EDGESHIP_CERT_FILE", "EDGESHIP_KEY_FILE",  # the same unit: the packager's identity
    "EDGESHIP_TELEGRAF_PASSWORD",  # docs/dashboard.md: Telegraf's broker password, read by Telegraf
    "EDGESHIP_PROBE_FAULT",  # agent/runtime/probe.py: test hook, read only by the runtime probe's child process
    "EDGESHIP_KEY_PASSPHRASE", "EDGESHIP_ROOT_KEY_PASSPHRASE",  # packager/keystore.py: the packager keys at rest
})


def override_names() -> frozenset[str]:
    """Every `EDGESHIP_<SECTION>_<KEY>` name the agent reads."""
    return frozenset(f"EDGESHIP_{section.upper()}_{f.name.upper()}"
                     for section, cls in _SECTIONS.items() for f in fields(cls))


def _check_env_names(env: Mapping[str, str]) -> None:
    """A mistyped override (`EDGESHIP_MQTT_UR`) is an error like a mistyped TOML key, never silently ignored."""
    known = override_names() | OTHER_ENV
    unknown = sorted(k for k in env if k.startswith("EDGESHIP_") and k not in known)
    if unknown:
        raise ConfigError(f"unknown environment variable(s) {', '.join(unknown)}: overrides are "
                          "EDGESHIP_<SECTION>_<KEY> for a key of the config file (docs/agent-config.md)")


def _validate(cfg: AgentConfig) -> None:
    for label, value in (("[agent] device_id", cfg.agent.device_id), ("[agent] fleet", cfg.agent.fleet),
                         ("[agent] group", cfg.agent.group)):
        if not is_id(value):
            raise ConfigError(f"{label} {value!r}: use {ID_RULE}")
    urls = [u.strip() for u in cfg.mqtt.url.split(",")]  # the list MqttClient takes (split_broker_urls)
    for text in urls:
        try:
            url = urlsplit(text)
            ok = url.scheme in ("mqtt", "mqtts") and bool(url.hostname) and url.path in ("", "/") \
                and url.query in ("", "subscribe_qos=0", "subscribe_qos=1") and not url.fragment and (url.port or 1) > 0
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"[mqtt] url {text!r}: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT], "
                              "optionally ?subscribe_qos=0")
    if len({urlsplit(u).scheme for u in urls}) > 1:
        raise ConfigError(f"[mqtt] url {cfg.mqtt.url!r}: brokers must be all mqtt:// or all mqtts://")
    if len(set(urls)) != len(urls):
        raise ConfigError(f"[mqtt] url {cfg.mqtt.url!r}: a broker is listed twice")
    if bool(cfg.mqtt.cert_file) != bool(cfg.mqtt.key_file):
        raise ConfigError("[mqtt] cert_file and key_file: give both or neither")
    if cfg.mqtt.cert_file and any(urlsplit(u).scheme != "mqtts" for u in urls):
        raise ConfigError("[mqtt] cert_file: a client certificate needs mqtts:// broker URLs")
    if cfg.mqtt.cert_file and not cfg.mqtt.ca_file:  # else TLS trusts the system's CAs: the fleet CA is not pinned
        raise ConfigError("[mqtt] cert_file needs ca_file: the fleet CA the broker's certificate must chain to")
    try:
        mirror_scheme = urlsplit(cfg.mirror.http).scheme
    except ValueError:  # "http://[::1": an unbalanced bracket in the host
        mirror_scheme = ""
    if cfg.mirror.http and mirror_scheme not in ("http", "https"):
        raise ConfigError(f"[mirror] http {cfg.mirror.http!r}: expected an http:// or https:// URL")
    prefix = cfg.topic_prefix
    if not prefix.endswith("/") or prefix.startswith(("/", "$")) or "//" in prefix \
            or any(c in prefix for c in "+#\0" + UNPORTABLE):
        raise ConfigError(f"[mqtt] topic_prefix {prefix!r}: it must end with '/', and hold no wildcards, no empty "
                          "level, no '$' at the start, no '.', '*', '>' or spaces (docs/transport.md)")


def check_paths(cfg: AgentConfig) -> None:
    """The files and directories the config names, checked before the agent starts (`edge-agent run`, `fetch`):
    a mistake here is a ConfigError naming the key and the path, not a daemon that looks healthy and does nothing.

    [trust] root: a readable regular file holding TUF root metadata. [agent] state_dir: created if missing, a
    directory the agent can write. [mqtt] ca_file, cert_file (if set): readable regular files; [mqtt] key_file
    (if set): a readable regular file, unencrypted, that neither group nor others may read. [trust] decrypt_key_file
    (if
    set): a readable regular file that neither group nor others may read (it is the key to every model granted)."""
    _readable_file("[trust] root", cfg.trust.root)
    try:
        doc = json.loads(cfg.trust.root.read_bytes())
        is_root = isinstance(doc, dict) and isinstance(doc.get("signed"), dict) and doc["signed"].get("_type") == "root"
    except (OSError, ValueError) as e:
        raise ConfigError(f"[trust] root {cfg.trust.root}: not TUF root metadata ({e})") from e
    if not is_root:
        raise ConfigError(f"[trust] root {cfg.trust.root}: not TUF root metadata (packager keys init writes it)")
    if cfg.mqtt.ca_file:
        _readable_file("[mqtt] ca_file", Path(cfg.mqtt.ca_file))
    if cfg.mqtt.cert_file:
        _readable_file("[mqtt] cert_file", Path(cfg.mqtt.cert_file))
        _readable_file("[mqtt] key_file", Path(cfg.mqtt.key_file))
        check_private_mode("[mqtt] key_file", Path(cfg.mqtt.key_file))
        if b"ENCRYPTED" in Path(cfg.mqtt.key_file).read_bytes()[:4096]:  # nobody could type its passphrase
            raise ConfigError(f"[mqtt] key_file {cfg.mqtt.key_file}: encrypted; a device's key must not be")
    if cfg.trust.decrypt_key_file:
        _readable_file("[trust] decrypt_key_file", Path(cfg.trust.decrypt_key_file))
        check_private_mode("[trust] decrypt_key_file", Path(cfg.trust.decrypt_key_file))
    state = cfg.agent.state_dir
    try:
        state.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise ConfigError(f"[agent] state_dir {state}: not a directory") from e
    except OSError as e:
        raise ConfigError(f"[agent] state_dir {state}: cannot create it ({e.strerror})") from e
    if not state.is_dir():
        raise ConfigError(f"[agent] state_dir {state}: not a directory")
    try:  # access() can be wrong (read-only mounts, ACLs): write something
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=state)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"[agent] state_dir {state}: not writable ({e.strerror})") from e


def check_private_mode(key: str, path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise ConfigError(f"{key} {path}: cannot read it ({e.strerror})") from e
    refuse_loose_key_mode(f"{key} {path}", mode)


def refuse_loose_key_mode(what: str, mode: int) -> None:
    """A private key file that group or others may read is refused (like ssh does), not quietly used."""
    if mode & 0o077:
        raise ConfigError(f"{what}: mode {stat.S_IMODE(mode):04o} lets others read the key; chmod 600 it")


def _readable_file(key: str, path: Path) -> None:
    try:
        with path.open("rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ConfigError(f"{key} {path}: not a regular file")
            f.read(1)
    except FileNotFoundError as e:
        raise ConfigError(f"{key} {path}: no such file") from e
    except IsADirectoryError as e:
        raise ConfigError(f"{key} {path}: is a directory, expected a file") from e
    except OSError as e:
        raise ConfigError(f"{key} {path}: cannot read it ({e.strerror})") from e


def load_config(path: Path, env: Mapping[str, str] | None = None) -> AgentConfig:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"config {path}: no such file") from e
    except OSError as e:
        raise ConfigError(f"config {path}: cannot read ({e.strerror})") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config {path}: not valid TOML ({e})") from e
    return parse_config(data, env, base_dir=path.resolve().parent)
